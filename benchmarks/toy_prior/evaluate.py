"""What the trained prior does: DDIM+CFG sample sheets, and stage 1 distilled from it.

`stage1_recovery` is the known-answer check of the SDS loop (also the CI test's): stage 1 from
the sphere init with `SDSGuidance` on the loaded prior, then the silhouette IoU of the Gaussians
over 16 held-out views against the object and against the object turned 180° (a back-to-front
result scores higher on the second). `mode` breaks the loop on purpose: `flipped` ascends the SDS
objective instead of descending it, `swapped` exchanges the front and back view prompts.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from benchmarks.toy_prior.data import VIEWS, render_views
from benchmarks.toy_prior.objects import PROMPTS, build_object, turned
from tdgen.config import ModelConfig, Stage1Config

HELD_OUT_ELEVATIONS = (15.0, -15.0)
HELD_OUT_AZIMUTHS = tuple(22.5 + 45.0 * k for k in range(8))
"""quality.py's held-out views: between the bake views, 16 in all."""

Mode = Literal["normal", "flipped", "swapped"]


def load_prior(folder: str | Path, device="cpu", tiny_encoder: str | Path | None = None):
    """The prior through tdgen's own loader (the `--model FOLDER` path); with `tiny_encoder`, an
    AutoencoderTiny folder as the SDS encoder (`model.sds_encoder=tiny`)."""
    from tdgen.guidance import load_model

    tiny = {} if tiny_encoder is None else dict(sds_encoder="tiny",
                                                tiny_encoder_id=str(tiny_encoder))
    return load_model(ModelConfig(id=str(folder), dtype="fp32" if torch.device(device).type
                                  == "cpu" else "auto", cuda_graphs=False, **tiny), device)


@torch.no_grad()
def sample(model, texts: list[str], size: int, guidance: float, steps: int,
           generator: torch.Generator) -> torch.Tensor:
    """DDIM with classifier-free guidance from pure noise: → [N, 3, size, size] in [0, 1]."""
    from diffusers import DDIMScheduler

    from tdgen.guidance import decode_latents, encode_texts, predict_noise_cfg

    sched = DDIMScheduler.from_config(model.scheduler.config, clip_sample=False)
    sched.set_timesteps(steps, device=model.device)
    cond = encode_texts(model, texts)
    uncond = encode_texts(model, [""]).expand(len(texts), -1, -1)
    h = size // 8
    lat = torch.randn((len(texts), 4, h, h), generator=generator, device=generator.device)
    lat = lat.to(model.device)
    for t in sched.timesteps:
        tb = t.reshape(1).repeat(len(texts)).to(model.device)
        eps = predict_noise_cfg(model, lat, tb, cond, uncond, guidance, use_graphs=False)
        lat = sched.step(eps, t, lat).prev_sample
    return decode_latents(model, lat)


def sample_sheet(model, objects: list[str], size: int, path: Path, guidance: float = 7.5,
                 steps: int = 50, seeds: int = 2, seed: int = 0) -> None:
    """One row per object: references at el 0° (front, side az 90°, back) on white, then
    `seeds` DDIM+CFG samples for each of the three view prompts."""
    from PIL import Image

    from tdgen.guidance import VIEW_SUFFIXES

    cfg = Stage1Config()
    gen = torch.Generator(device=model.device).manual_seed(seed)
    rows = []
    for name in objects:
        ref = render_views(build_object(name), [0.0, 0.0, 0.0], [0.0, 90.0, 180.0],
                           torch.ones(3, 3), size, cfg)  # [3, S, S, 3]
        texts = [PROMPTS[name] + VIEW_SUFFIXES[v] for v in VIEWS for _ in range(seeds)]
        s = sample(model, texts, size, guidance, steps, gen).permute(0, 2, 3, 1).cpu()
        rows.append(torch.cat([*ref, torch.full((size, 4, 3), 0.5), *s], dim=1))
    img = (torch.cat(rows, 0).numpy() * 255 + 0.5).astype(np.uint8)
    Image.fromarray(img).save(path)


def held_out_cameras(resolution: int, cfg: Stage1Config, device="cpu"):
    from tdgen.render import orbit_cameras

    el, az = np.meshgrid(HELD_OUT_ELEVATIONS, HELD_OUT_AZIMUTHS, indexing="ij")
    return orbit_cameras(el.ravel(), az.ravel(), cfg.camera_radius, cfg.fovy, resolution,
                         resolution, device)


@torch.no_grad()
def silhouette_iou(gaussians, ref, cams) -> float:
    """Mask IoU (alpha > 0.5) of the Gaussians' renders against the reference mesh's."""
    from tdgen.raster import render_mesh
    from tdgen.render import render_gaussians

    bg = torch.zeros(len(cams), 3, device=cams.device)
    a = render_gaussians(gaussians.to(cams.device), cams, bg).alpha[..., 0] > 0.5
    _, ra = render_mesh(ref.mesh, torch.from_numpy(ref.texture), cams, bg)
    r = ra[..., 0] > 0.5
    return float((a & r).sum() / (a | r).sum().clamp_min(1))


@torch.no_grad()
def colour_error(gaussians, ref, cams) -> dict:
    """Mean |RGB| error (0–1 per channel) of the Gaussians' renders against the reference mesh's
    where both cover the pixel (alpha > 0.5, black background), so it scores colour apart from
    the silhouette; beside it the same error of the reference's own mean foreground colour painted
    flat over that mask (a colourless but right-on-average result), and the covered fraction."""
    from tdgen.raster import render_mesh
    from tdgen.render import render_gaussians

    bg = torch.zeros(len(cams), 3, device=cams.device)
    out = render_gaussians(gaussians.to(cams.device), cams, bg)
    a = out.alpha[..., 0] > 0.5
    r_rgb, r_a = render_mesh(ref.mesh, torch.from_numpy(ref.texture), cams, bg)
    r = r_a[..., 0] > 0.5
    both = a & r
    if not bool(both.any()):
        return {"colour_err": float("nan"), "colour_err_flat": float("nan"), "covered": 0.0}
    # Divide by alpha: a splat edge at alpha .6 over black is darker than its colour.
    rgb = out.rgb / out.alpha.clamp_min(1e-6)
    r_rgb = r_rgb / r_a.clamp_min(1e-6)
    err = (rgb.clamp(0, 1) - r_rgb.clamp(0, 1)).abs()[both].mean()
    flat = r_rgb[r].mean(0)
    err_flat = (flat - r_rgb.clamp(0, 1)).abs()[both].mean()
    return {"colour_err": float(err), "colour_err_flat": float(err_flat),
            "covered": float(both.sum() / r.sum().clamp_min(1))}


class _Probe:
    """Passes through to SDS (negated when `flip`: the loop then climbs the objective it should
    descend) and records how far renders leave [0, 1] (gsplat clamps colours only at 0)."""

    def __init__(self, sds, flip: bool = False):
        self.sds, self.sign = sds, -1.0 if flip else 1.0
        self.over: list[float] = []  # fraction of pixel values > 1 per step
        self.max: float = 0.0

    def loss(self, images, cams, backgrounds, progress):
        with torch.no_grad():
            self.over.append(float((images > 1.0).float().mean()))
            self.max = max(self.max, float(images.max()))
        return self.sign * self.sds.loss(images, cams, backgrounds, progress)


def stage1_config(**overrides) -> Stage1Config:
    """Stage 1 at the CPU prior's 64 px, with quality.py's smoke learning rates (a few hundred
    steps must move colours and opacities as far as 500 default steps do)."""
    base = dict(steps=300, resolution=64, encode_resolution=64, num_points=1000,
                max_points=4000, lr_position=0.02, lr_position_final=0.002, lr_color=0.05,
                lr_opacity=0.1, lr_scale=0.01, densify_every=25, guidance_scale=20.0)
    base.update(overrides)
    return replace(Stage1Config(), **base)


def stage1_recovery(model, obj: str, cfg: Stage1Config, seed: int = 0, mode: Mode = "normal",
                    backend="auto", images: Path | None = None) -> dict:
    """Stage 1 against the prior for `PROMPTS[obj]`; IoU against the object and turned 180°."""
    from tdgen.guidance import SDSGuidance, encode_prompt
    from tdgen.optimize import optimize_gaussians
    from tdgen.runtime import make_generator

    device = model.device
    emb = encode_prompt(model, PROMPTS[obj], cfg.negative_prompt, cfg.view_prompts)
    if mode == "swapped":
        emb.views = {**emb.views, "front": emb.views["back"], "back": emb.views["front"]}
    gen = make_generator(seed, device)
    sds = SDSGuidance(model, emb, cfg, gen)
    guidance = _Probe(sds, flip=mode == "flipped")
    res = optimize_gaussians(guidance, cfg, device, gen, backend=backend)
    ref = build_object(obj)
    cams = held_out_cameras(cfg.resolution, cfg, device)
    g = res.gaussians.detach()
    out = {"object": obj, "mode": mode, "steps": cfg.steps, "guidance": cfg.guidance_scale,
           "iou": silhouette_iou(g, ref, cams), "iou_turned": silhouette_iou(g, turned(ref), cams),
           **colour_error(g, ref, cams),
           "gaussians": g.num, "seconds": round(res.seconds, 1), "nan_steps": sds.nan_count,
           "render_over_1": float(np.mean(guidance.over)), "render_max": guidance.max}
    if images is not None:
        save_result_sheet(g, ref, cams, images)
    return out


@torch.no_grad()
def save_result_sheet(gaussians, ref, cams, path: Path, n: int = 8) -> None:
    """Reference on top, the stage-1 Gaussians below, the first `n` held-out views, grey bg."""
    from PIL import Image

    from tdgen.raster import render_mesh
    from tdgen.render import render_gaussians

    bg = torch.full((len(cams), 3), 0.5, device=cams.device)
    g = render_gaussians(gaussians.to(cams.device), cams, bg).rgb[:n]
    r, _ = render_mesh(ref.mesh, torch.from_numpy(ref.texture), cams, bg)
    rows = [torch.cat(list(x[:n].clamp(0, 1).cpu()), dim=1) for x in (r, g)]
    Image.fromarray((torch.cat(rows, 0).numpy() * 255 + 0.5).astype(np.uint8)).save(path)
