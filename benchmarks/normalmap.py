"""Does the normal map bring the high-poly's look back to the decimated mesh? Lit renders.

For each shape: the high-resolution surface, that surface decimated hard (mesh.decimate, as
the pipeline does), unwrapped (xatlas) and given a normal map (`normalmap.bake_normal_map`).
All three are drawn with our rasterizer in one grey Lambert material under a fixed world light
(plus ambient), from 8 views around and 2 above/below. Against the high-poly's renders:
PSNR over the pixels either silhouette covers, and normal consistency (mean n·n' of the
per-pixel shading normal and the high-poly's, over the pixels both cover), for the low-poly alone
and for the low-poly with its normal map (decoded in the exported TANGENT frame, as a glTF
client does). Prints a table (stderr) and JSON (stdout); `--images DIR` writes a comparison PNG.

    python benchmarks/normalmap.py --json-out r.json --images out/   # ~1 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import environment, set_threads  # noqa: E402
from tdgen.config import TextureConfig  # noqa: E402
from tdgen.mesh import decimate, vertex_normals  # noqa: E402
from tdgen.meshdata import Mesh  # noqa: E402
from tdgen.normalmap import bake_normal_map, vertex_tangents  # noqa: E402
from tdgen.raster import cameras_around, interpolate, rasterize, sample_texture  # noqa: E402
from tdgen.unwrap import unwrap_mesh  # noqa: E402

LIGHT = F.normalize(torch.tensor([0.5, 0.7, 0.6]), dim=0)
"""World direction toward the light: above, front-right (fixed for every view)."""
AMBIENT = 0.15
ALBEDO = 0.8
RES = 256


def welded(m: Mesh) -> Mesh:
    """One vertex per position (the references split their uv seams), area-weighted normals."""
    v, inv = np.unique(m.vertices.astype(np.float32), axis=0, return_inverse=True)
    f = inv.reshape(-1)[m.faces]
    f = f[(f[:, 0] != f[:, 1]) & (f[:, 1] != f[:, 2]) & (f[:, 2] != f[:, 0])]
    return Mesh(v, f.astype(np.int64), vertex_normals(v, f))


def shapes() -> dict[str, Mesh]:
    from benchmarks.references import build_reference

    import trimesh

    out = {"rock": welded(build_reference("rock").mesh)}
    # A marching-cubes-sized surface (~80k triangles, like mesh.grid = 128) with finer bumps.
    s = trimesh.creation.icosphere(subdivisions=6, radius=0.5)
    d = s.vertices / np.linalg.norm(s.vertices, axis=1, keepdims=True)
    r = 0.5 * (1 + 0.04 * np.sin(11 * d[:, 0] + 1) * np.sin(13 * d[:, 1]) * np.sin(9 * d[:, 2] + 2)
               + 0.02 * np.sin(23 * d[:, 1] + 3 * d[:, 0]))
    v = (d * r[:, None]).astype(np.float32)
    f = s.faces.astype(np.int64)
    out["bumpy_ball"] = Mesh(v, f, vertex_normals(v, f))
    return out


def render(mesh: Mesh, cams, normal_map: torch.Tensor | None = None):
    """Lambert shading [C, H, W] (0 outside), shading normals [C, H, W, 3], mask [C, H, W]."""
    verts = torch.as_tensor(mesh.vertices).float()
    faces = torch.as_tensor(mesh.faces).long()
    r = rasterize(verts, faces, cams, cull_backfaces=True)
    mask = r.face_id >= 0
    n = F.normalize(interpolate(torch.as_tensor(mesh.normals).float(), faces, r), dim=-1)
    if normal_map is not None:
        # As a glTF client: TBN from the TANGENT attribute, B = w·cross(N, T), m = 2·rgb − 1.
        tg = interpolate(torch.as_tensor(vertex_tangents(mesh)), faces, r)
        t = F.normalize(tg[..., :3], dim=-1)
        b = F.normalize(torch.linalg.cross(n, t), dim=-1) * torch.where(tg[..., 3:] < 0, -1.0, 1.0)
        m = sample_texture(normal_map, interpolate(torch.as_tensor(mesh.uvs).float(), faces, r)) * 2 - 1
        n = F.normalize(m[..., :1] * t + m[..., 1:2] * b + m[..., 2:] * n, dim=-1)
    shade = ALBEDO * (AMBIENT + (n * LIGHT).sum(-1).clamp_min(0.0))
    return torch.where(mask, shade, 0.0), torch.where(mask[..., None], n, 0.0), mask


def psnr(a, b, mask) -> float:
    mse = float(((a - b) ** 2)[mask].mean())
    return 10 * math.log10(1.0 / max(mse, 1e-12))


def measure(name: str, high: Mesh, triangles: int, size: int) -> tuple[dict, list]:
    cfg = TextureConfig(size=size)
    v, f = decimate(high.vertices, high.faces, triangles)
    low = unwrap_mesh(Mesh(v.astype(np.float32), f, vertex_normals(v, f)), cfg)
    t0 = time.perf_counter()
    nm = bake_normal_map(high, low, cfg)
    bake_s = time.perf_counter() - t0
    el = [0, 0, 0, 0, 0, 0, 0, 0, 45, -45]
    az = [0, 45, 90, 135, 180, 225, 270, 315, 30, 210]
    cams = cameras_around(np.zeros(3), 0.5, el, az, RES, fovy=40.0)
    hs, hn, hm = render(high, cams)
    rec = {"shape": name, "high_triangles": high.num_faces, "low_triangles": low.num_faces,
           "texture": size, "bake_s": round(bake_s, 3), "views": len(el)}
    images = [hs]
    for key, m in (("low", None), ("low+normalmap", nm)):
        s, n, mask = render(low, cams, m)
        both = hm & mask
        rec[key] = {"psnr": round(psnr(s, hs, hm | mask), 2),
                    "psnr_both": round(psnr(s, hs, both), 2),
                    "normal_consistency": round(float((n * hn).sum(-1)[both].mean()), 4),
                    "normal_error_deg": round(float(torch.rad2deg(torch.arccos(
                        (n * hn).sum(-1)[both].clamp(-1, 1))).mean()), 2)}
        images.append(s)
    return rec, images + [nm]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=1024, help="normal map size (texels)")
    ap.add_argument("--images", type=Path, default=None, help="write normalmap.png here")
    ap.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args()
    set_threads(2)
    cases = [("rock", 600), ("rock", 2000), ("bumpy_ball", 2000), ("bumpy_ball", 5000)]
    meshes = shapes()
    results, rows = [], []
    for name, tris in cases:
        rec, imgs = measure(name, meshes[name], tris, args.size)
        results.append(rec)
        rows.append((f"{name} {rec['low_triangles']}", imgs))
        print(f"{name:<11} {rec['high_triangles']:>6} → {rec['low_triangles']:>5} tris  bake {rec['bake_s']:.2f} s  "
              f"PSNR low {rec['low']['psnr']:.2f} / +map {rec['low+normalmap']['psnr']:.2f} dB  "
              f"NC low {rec['low']['normal_consistency']:.4f} / +map {rec['low+normalmap']['normal_consistency']:.4f}",
              file=sys.stderr)
    report = {"environment": environment("cpu"), "light": LIGHT.tolist(), "ambient": AMBIENT,
              "resolution": RES, "results": results}
    text = json.dumps(report, indent=1)
    print(text)
    if args.json_out:
        args.json_out.write_text(text + "\n")
    if args.images:
        from PIL import Image

        args.images.mkdir(parents=True, exist_ok=True)
        # one row per case: view 1 (front-right) high | low | low + map, then the map itself
        tiles = []
        for _, (hs, ls, ms, nm) in rows:
            view = [x[1].clamp(0, 1) for x in (hs, ls, ms)]
            grey = [np.repeat((v.numpy() * 255).astype(np.uint8)[..., None], 3, -1) for v in view]
            nmi = (nm.numpy() * 255).round().astype(np.uint8)
            nmi = np.asarray(Image.fromarray(nmi).resize((RES, RES), Image.BILINEAR))
            tiles.append(np.concatenate(grey + [nmi], 1))
        Image.fromarray(np.concatenate(tiles, 0)).save(args.images / "normalmap.png")


if __name__ == "__main__":
    main()
