"""`data`: renders of the toy objects from stage 1's camera distribution, captioned as SDS sees.

Cameras are `tdgen.render.sample_orbit_cameras` with `Stage1Config`'s radius, fov and elevation
range; backgrounds white or black at random (stage 1's `random`); captions are
`PROMPTS[obj] + VIEW_SUFFIXES[view_name(az)]`, the strings `guidance.encode_prompt` encodes.

The pictures come from our triangle rasterizer (`tdgen.raster.render_mesh`) at 2× and area-
downsampled, not from Gaussians sampled on the surface: the prior should depict the object
itself (surface splats are fatter by their own extent), the rasterizer is 25× faster on CPU, and
the 2× supersampling gives the soft edges stage 1's splat renders have.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.toy_prior.objects import PROMPTS, build_object
from tdgen.config import Stage1Config
from tdgen.guidance import VIEW_SUFFIXES, view_name

VIEWS = tuple(VIEW_SUFFIXES)  # ("front", "side", "back")


def caption(obj: str, azimuth: float) -> str:
    """The view prompt SDS uses for a camera at `azimuth` (encode_prompt's text)."""
    return PROMPTS[obj] + VIEW_SUFFIXES[view_name(azimuth)]


@dataclass
class ToyData:
    images: np.ndarray  # [N, H, W, 3] uint8
    obj: np.ndarray  # [N] int, index into `objects`
    view: np.ndarray  # [N] int, index into VIEWS
    elevation: np.ndarray  # [N] degrees
    azimuth: np.ndarray  # [N] degrees
    background: np.ndarray  # [N] 0 black, 1 white
    objects: list[str]

    @property
    def captions(self) -> list[str]:
        return [caption(self.objects[o], a) for o, a in zip(self.obj, self.azimuth)]

    def save(self, path: str | Path) -> None:
        np.savez_compressed(path, images=self.images, obj=self.obj, view=self.view,
                            elevation=self.elevation, azimuth=self.azimuth,
                            background=self.background, objects=np.array(self.objects))

    @classmethod
    def load(cls, path: str | Path) -> ToyData:
        z = np.load(path)
        return cls(z["images"], z["obj"], z["view"], z["elevation"], z["azimuth"],
                   z["background"], [str(s) for s in z["objects"]])


def render_views(ref, elevation, azimuth, backgrounds, size: int, cfg: Stage1Config,
                 device="cpu", supersample: int = 2) -> torch.Tensor:
    """Renders of `ref` at stage-1 orbit cameras: elevation/azimuth [C] degrees, backgrounds
    [C, 3] → [C, size, size, 3] float in [0, 1]."""
    from tdgen.raster import render_mesh
    from tdgen.render import orbit_cameras

    big = size * supersample
    cams = orbit_cameras(elevation, azimuth, cfg.camera_radius, cfg.fovy, big, big, device)
    tex = torch.from_numpy(ref.texture).to(device)
    rgb, _ = render_mesh(ref.mesh, tex, cams, backgrounds.to(device))  # [C, big, big, 3]
    rgb = F.interpolate(rgb.permute(0, 3, 1, 2), (size, size), mode="area")
    return rgb.permute(0, 2, 3, 1).clamp(0, 1)


def make_data(objects: list[str], per_object: int, size: int, seed: int = 0,
              device="cpu", chunk: int = 64) -> ToyData:
    """`per_object` random stage-1 views of each object at `size`² pixels."""
    cfg = Stage1Config()
    from tdgen.render import sample_orbit_cameras

    gen = torch.Generator().manual_seed(seed)
    images, objs, views, els, azs, bgs = [], [], [], [], [], []
    for oi, name in enumerate(objects):
        ref = build_object(name)
        for start in range(0, per_object, chunk):
            n = min(chunk, per_object - start)
            cams = sample_orbit_cameras(n, cfg, size, gen)
            white = (torch.rand(n, generator=gen) < 0.5).float()
            rgb = render_views(ref, cams.elevation, cams.azimuth, white[:, None].expand(n, 3),
                               size, cfg, device)
            images.append((rgb.cpu().numpy() * 255 + 0.5).astype(np.uint8))
            objs.append(np.full(n, oi))
            views.append(np.array([VIEWS.index(view_name(a)) for a in cams.azimuth.tolist()]))
            els.append(cams.elevation.numpy())
            azs.append(cams.azimuth.numpy())
            bgs.append(white.numpy().astype(np.uint8))
    cat = np.concatenate
    return ToyData(cat(images), cat(objs), cat(views), cat(els).astype(np.float32),
                   cat(azs).astype(np.float32), cat(bgs), list(objects))
