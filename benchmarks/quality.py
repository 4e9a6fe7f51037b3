"""Known-answer quality benchmark: reconstruct reference objects and measure the .glb against them.

Case A (stage 2 alone): Gaussians placed on the reference surface → `.ply` → `pipeline.mesh_from_splat`
(the `tdgen mesh` path) → `.glb`.
Case B (whole pipeline, oracle guidance): an `OracleGuidance` that renders the reference from the
sampled cameras replaces SDS in `optimize_gaussians` (sphere init, densification) → the same
stage 2 → `.glb`.

Metrics compare the re-read `.glb` with the reference after undoing only the export's known
normalisation (height `export.height`, pivot at the bottom centre): Chamfer-L1 and F-score at 1 %
of the reference's bounding-box diagonal, normal consistency, and mask IoU / PSNR of textured
renders from held-out views (elevation ±15°, azimuths 22.5° + k·45°, none of the bake views).

    python benchmarks/quality.py --smoke                 # CPU, CI-sized, thresholds checked
    python benchmarks/quality.py --device cuda           # GPU, full sizes
    python benchmarks/quality.py --ref chair.glb --cases A --json
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from benchmarks.common import environment, format_table, log, set_threads, to_json
from benchmarks.references import BUILDERS, Reference, build_reference, load_reference, load_textured
from tdgen.config import Config, resolve_config
from tdgen.meshdata import Mesh

HELD_OUT_ELEVATIONS = (15.0, -15.0)
HELD_OUT_AZIMUTHS = tuple(22.5 + 45.0 * k for k in range(8))
"""Held-out views: between the bake views' azimuths (multiples of 45°) and elevations (0, ±30°)."""

METRIC_BACKGROUND = (0.5, 0.5, 0.5)
"""Background of the held-out renders; mid grey so neither a white nor a black part hides."""

SMOKE_OBJECTS = ("sphere", "mug")
"""What `--smoke` measures by default: a checker (texture placement) and the asymmetric mug with
its thin handle (flips, thin parts). The thresholds below are set for these two."""

# Smoke thresholds, from measured CPU values with margin. Each is missed by a deliberately broken
# stage: a grey bake (PSNR∩), a mesh shifted by 10 % or mirrored (chamfer, IoU), an inner wall or
# shredded shell (NC±, case A only: B's splats have one, see README), an oracle run that learned
# little (B) — and case A by the old density surface on flat surfels (tests/test_benchmarks.py).
SMOKE_THRESHOLDS: dict[str, dict[str, tuple[str, float]]] = {
    # Case A is flat surfels (normal axis 1/10 of the in-plane ones), meshed by `auto` → fusion.
    # measured (sphere / mug), 2026-12-02: chamfer .0038/.0054, F .998/.941, NC± .997/.975, IoU
    # .991/.966, PSNR∩ 16.0/18.7, one closed piece each (2026-12-01: mug chamfer .0074, F .801).
    # The old density surface on the same mug: chamfer .0293, F .076, NC± .358, IoU .783 (12
    # pieces); the mug shifted 10 %: chamfer .040, IoU .73; grey bake: PSNR∩ 9–11.
    "A": {"chamfer": ("<", 0.010), "fscore": (">", 0.8), "normal_agreement": (">", 0.93),
          "mask_iou": (">", 0.93), "psnr_masked": (">", 14.0)},
    # measured over runs: chamfer .026–.039/.032–.038, IoU .90–.965/.812–.866, PSNR∩ 14.6–16.4/
    # 15.3–18.2; a mean-colour ball (a stage 1 that learned only the silhouette's size): mug
    # chamfer .052, IoU .655, PSNR∩ 11.5. F@1 % is not held here: at the smoke grid a 1 % ball is
    # about one voxel, so it swings with every change of the stage-1 numerics.
    "B": {"chamfer": ("<", 0.045), "mask_iou": (">", 0.75), "psnr_masked": (">", 13.5)},
}
SMOKE_OBJECT_THRESHOLDS: dict[tuple[str, str], dict[str, tuple[str, float]]] = {
    # The sphere's case A is near exact, so a 10 % stretch along x (chamfer .010, IoU .950) must
    # fail too. The mug's cannot be held that tight: its mesh is one shell-thickness fatter than
    # the splat, which the height normalisation turns into a narrower mug of the same kind.
    ("A", "sphere"): {"chamfer": ("<", 0.008), "mask_iou": (">", 0.965)},
}


# ---------------------------------------------------------------------------------------------
# Configurations


def quality_config(smoke: bool, device: torch.device, preset: str = "standard",
                   sets: dict[str, str] | None = None) -> Config:
    """The benchmark's Config: `preset` (no refinement, no model) or a CPU-sized smoke one, then
    `sets` (`--set` overrides, e.g. mesh.method=density to measure the old surface).

    Refinement is off because its target comes from a diffusion model, which has no known answer.
    """
    common = {
        "texture.refine_steps": 0,
        "export.preview": False,
        "export.splat": False,
        "export.lods": 0,
        # Case B's oracle is 3DGS's own L1 loss, the one densify_grad is calibrated on; the
        # fraction rule (the SDS default) is not what a trained 3DGS splat was grown with.
        "stage1.densify_fraction": 0.0,
        **(sets or {}),
    }
    if not smoke:
        return resolve_config(preset, common)
    return resolve_config(
        "draft",
        {
            **common,
            # Case B: the CPU renderer costs 0.02–0.3 s a step, so 200 steps and
            # few Gaussians, with learning rates raised so colours, opacities (logit −2.2 → +2)
            # and scales can get where they must within that many Adam steps.
            "stage1.steps": 200,
            "stage1.resolution": 128,
            "stage1.encode_resolution": 0,
            "stage1.num_points": 600,
            "stage1.max_points": 3000,
            "stage1.lr_position": 0.02,
            "stage1.lr_position_final": 0.002,
            "stage1.lr_color": 0.08,
            "stage1.lr_opacity": 0.15,
            "stage1.lr_scale": 0.02,
            "stage1.densify_every": 10,
            "mesh.grid": 64,
            "mesh.triangles": 3000,
            "texture.size": 512,
            "texture.bake_views": 14,
            "texture.bake_resolution": 96,
        },
    )


@dataclass(frozen=True)
class Sizes:
    surface_gaussians: int
    """Case A: Gaussians sampled on the reference surface."""
    metric_points: int
    """Surface samples per mesh for Chamfer / F-score / normal consistency."""
    metric_resolution: int
    """Held-out render size (pixels, square)."""


SMOKE_SIZES = Sizes(surface_gaussians=2500, metric_points=20_000, metric_resolution=128)
FULL_SIZES = Sizes(surface_gaussians=60_000, metric_points=100_000, metric_resolution=512)


# ---------------------------------------------------------------------------------------------
# Case A: Gaussians on the reference surface


def gaussians_on_surface(ref: Reference, n: int, seed: int = 0, flatness: float = 0.1,
                         spread: float = 1.0, opacity: float = 0.95, min_thickness: float = 0.0):
    """`n` Gaussians sampled area-uniformly on the reference, coloured by its texture.

    Each is a disc in the tangent plane: tangential std-dev `spread`·(mean sample spacing), normal
    std-dev `flatness` times that but at least `min_thickness` (world units), rotation taking
    local z to the face normal.
    """
    import trimesh
    from scipy.spatial.transform import Rotation

    from tdgen.gaussians import C0, Gaussians
    from tdgen.raster import sample_texture

    m = ref.mesh
    tm = trimesh.Trimesh(m.vertices, m.faces, process=False)
    pts, fidx, bary = trimesh.sample.sample_surface(tm, n, seed=seed, return_barycentric=True)
    uv = (bary[:, :, None] * m.uvs[m.faces[fidx]]).sum(1)  # [N, 2]
    rgb = sample_texture(torch.from_numpy(ref.texture), torch.from_numpy(uv).float()).clamp(0, 1)

    normal = np.asarray(tm.face_normals)[fidx]  # [N, 3]
    helper = np.where(np.abs(normal[:, :1]) < 0.9, [[1.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]])
    t1 = np.cross(normal, helper)
    t1 /= np.linalg.norm(t1, axis=1, keepdims=True)
    t2 = np.cross(normal, t1)  # t1 × t2 = normal: a proper rotation with columns (t1, t2, n)
    rot = np.stack([t1, t2, normal], axis=2)  # [N, 3, 3]
    quats = Rotation.from_matrix(rot).as_quat(scalar_first=True)  # [N, 4] w-first

    sigma_t = spread * math.sqrt(tm.area / n)
    log_s = np.log([sigma_t, sigma_t, max(flatness * sigma_t, min_thickness)])
    return Gaussians(
        means=torch.from_numpy(pts).float(),
        scales=torch.tensor(log_s, dtype=torch.float32).repeat(n, 1),
        quats=torch.from_numpy(quats).float(),
        opacities=torch.full((n,), math.log(opacity / (1 - opacity))),
        sh0=(rgb - 0.5) / C0,
        shN=torch.zeros(n, 0, 3),
    )


def run_case_a(ref: Reference, cfg: Config, sizes: Sizes, workdir: Path,
               device: torch.device) -> tuple[Path, dict, dict]:
    """Stage 2 alone, through `pipeline.mesh_from_splat`; returns the .glb, timings and counts."""
    from tdgen.gaussians import save_ply
    from tdgen.pipeline import mesh_from_splat

    ply = workdir / f"{ref.name}_A.ply"
    # Flat surfels (normal std-dev a tenth of the in-plane one), the shape trained 3DGS converges to.
    g = gaussians_on_surface(ref, sizes.surface_gaussians, seed=cfg.seed)
    save_ply(g, ply)
    out = workdir / f"{ref.name}_A.glb"
    res = mesh_from_splat(ply, cfg, out, device=device)
    return out, dict(res.timings), dict(res.counts)


# ---------------------------------------------------------------------------------------------
# Case B: the whole pipeline against an oracle


class OracleGuidance:
    """A `tdgen.guidance.Guidance` whose answer is known: photometric loss against the reference
    rendered (our rasterizer, unlit) from the same cameras over the same backgrounds.

    The renders stand in for what SDS would "imagine"; nothing else in stage 1 changes. L1 by
    default: gsplat's densify threshold (`grow_grad2d` 2e-4) is calibrated on 3DGS's L1 loss, and
    an MSE's gradients fade as the error shrinks, so densification would rarely fire.
    """

    def __init__(self, ref: Reference, device: torch.device, kind: str = "l1", weight: float = 1.0,
                 detail: float = 0.0):
        self.mesh = ref.mesh
        self.texture = torch.from_numpy(ref.texture).to(device)  # [S, S, 3]
        self.kind = kind
        self.weight = weight
        self.detail = detail
        self.calls = 0
        if detail > 0:  # the mesh and the pattern's waves, once: target() runs every fit step
            self._faces = torch.as_tensor(np.asarray(ref.mesh.faces), device=device).long()
            self._verts = torch.as_tensor(np.asarray(ref.mesh.vertices), device=device).float()
            self._uvs = torch.as_tensor(np.asarray(ref.mesh.uvs), device=device).float()
            gen = torch.Generator().manual_seed(7)
            dirs = F.normalize(torch.randn(6, 3, generator=gen), dim=-1)
            period = 0.06 + 0.09 * torch.rand(6, generator=gen)
            self._phase = (2 * math.pi * torch.rand(6, generator=gen)).to(device)  # [6]
            self._k = (2 * math.pi / period[:, None] * dirs).to(device)  # [6, 3] wave vectors

    def target(self, cams, backgrounds: Tensor) -> Tensor:  # [B, 3] → [B, 3, H, W]
        from tdgen.raster import render_mesh

        with torch.no_grad():
            if self.detail > 0:
                return self._detailed(cams, backgrounds)
            rgb, _ = render_mesh(self.mesh, self.texture, cams, backgrounds)  # [B, H, W, 3]
        return rgb.permute(0, 3, 1, 2)

    def _detailed(self, cams, backgrounds: Tensor) -> Tensor:  # [B, 3] → [B, 3, H, W]
        """The reference's colours times 1 ± `detail` of a fixed 3D pattern (6–15 cm waves in
        world space). Flat-coloured unlit faces give a photometric fit nothing but silhouettes
        to place them by (any surface behind the silhouette renders the same image); a real
        capture or a diffusion model's image always has shading or texture there."""
        from tdgen.raster import interpolate, rasterize, sample_texture

        # render_mesh's steps, plus the world position it does not return
        dev = cams.viewmats.device
        faces, verts = self._faces.to(dev), self._verts.to(dev)
        r = rasterize(verts, faces, cams)
        mask = (r.face_id >= 0)[..., None]  # [B, H, W, 1]
        uv = interpolate(self._uvs.to(dev), faces, r)
        colour = sample_texture(self.texture.to(dev), uv)  # [B, H, W, 3]
        pos = interpolate(verts, faces, r)  # [B, H, W, 3] world
        phase = pos @ self._k.to(dev).T + self._phase.to(dev)  # [B, H, W, 6]
        wave = torch.sin(phase).mean(-1, keepdim=True) * math.sqrt(2.0)  # about [-1, 1]
        colour = (colour * (1.0 + self.detail * wave)).clamp(0, 1)
        bg = torch.as_tensor(backgrounds, dtype=colour.dtype, device=dev).reshape(-1, 3)
        rgb = torch.where(mask, colour, bg.expand(len(colour), 3)[:, None, None, :])
        return rgb.permute(0, 3, 1, 2)

    def loss(self, images: Tensor, cams, backgrounds: Tensor, progress: float) -> Tensor:
        """images [B, 3, H, W] in [0, 1] (differentiable), backgrounds [B, 3] → scalar."""
        self.calls += 1
        target = self.target(cams, backgrounds).to(images)
        if target.shape[-2:] != images.shape[-2:]:
            target = F.interpolate(target, images.shape[-2:], mode="area")
        if self.kind == "l1":
            return self.weight * (images - target).abs().mean()
        return self.weight * F.mse_loss(images, target)


def run_case_b(ref: Reference, cfg: Config, workdir: Path, device: torch.device,
               detail: float = 0.0) -> tuple[Path, dict, dict]:
    """Sphere init → `optimize_gaussians` with the oracle → `.ply` → `pipeline.mesh_from_splat`;
    returns the .glb, timings and stage-1 facts (Gaussians, loss at the start and end)."""
    from tdgen.gaussians import save_ply
    from tdgen.optimize import optimize_gaussians
    from tdgen.pipeline import mesh_from_splat
    from tdgen.runtime import make_generator

    oracle = OracleGuidance(ref, device, detail=detail)
    t0 = time.perf_counter()
    s1 = optimize_gaussians(oracle, cfg.stage1, device, make_generator(cfg.seed, device))
    t_stage1 = time.perf_counter() - t0
    ply = workdir / f"{ref.name}_B.ply"
    save_ply(s1.gaussians.detach().to("cpu"), ply)
    out = workdir / f"{ref.name}_B.glb"
    res = mesh_from_splat(ply, cfg, out, device=device)
    losses = s1.losses
    first = float(np.mean(losses[: max(1, len(losses) // 10)]))
    last = float(np.mean(losses[-max(1, len(losses) // 10):]))
    return out, {"stage1": t_stage1, **res.timings}, {
        "gaussians": s1.gaussians.num, "loss_first": first, "loss_last": last,
        "oracle_calls": oracle.calls}


# ---------------------------------------------------------------------------------------------
# Alignment: the export's own normalisation


def read_glb_in_reference_frame(glb: Path, ref: Reference, height: float) -> tuple[Mesh, np.ndarray]:
    """The exported asset mapped into the reference's world frame by the inverse of the
    normalisation the export applies to the *reference* — the only alignment allowed."""
    from tdgen.export import place_for_export

    mesh, tex = load_textured(glb)
    # The export's own placement applied to the reference: exported = (v − offset)·scale.
    offset, scale = place_for_export(ref.mesh.vertices, height)
    v = mesh.vertices.astype(np.float64) / scale + offset
    return Mesh(v.astype(np.float32), mesh.faces, mesh.normals, mesh.uvs), tex


# ---------------------------------------------------------------------------------------------
# Metrics


def _surface_samples(mesh: Mesh, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    import trimesh

    tm = trimesh.Trimesh(mesh.vertices, mesh.faces, process=False)
    pts, fidx = trimesh.sample.sample_surface(tm, n, seed=seed)
    return pts, np.asarray(tm.face_normals)[fidx]  # [n, 3], [n, 3]


def geometry_metrics(pred: Mesh, ref: Mesh, n: int = 50_000, seed: int = 0) -> dict[str, float]:
    """Chamfer-L1 (mean of both directions) and F-score at τ, both relative to the reference's
    bounding-box diagonal; normal consistency |n·n'| (orientation-free, as in Occupancy Networks)
    and normal agreement n·n' (signed: inverted winding shows up here)."""
    from scipy.spatial import cKDTree

    diag = float(np.linalg.norm(ref.vertices.max(0) - ref.vertices.min(0)))
    p_pts, p_n = _surface_samples(pred, n, seed)
    r_pts, r_n = _surface_samples(ref, n, seed + 1)
    d_pr, i_pr = cKDTree(r_pts).query(p_pts)  # prediction → reference (accuracy)
    d_rp, i_rp = cKDTree(p_pts).query(r_pts)  # reference → prediction (completeness)
    tau = 0.01 * diag
    precision = float((d_pr < tau).mean())
    recall = float((d_rp < tau).mean())
    fscore = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    dots = np.concatenate([(p_n * r_n[i_pr]).sum(1), (r_n * p_n[i_rp]).sum(1)])
    return {
        "chamfer": float(0.5 * (d_pr.mean() + d_rp.mean()) / diag),
        "fscore": fscore,
        "precision": precision,
        "recall": recall,
        "normal_consistency": float(np.abs(dots).mean()),
        "normal_agreement": float(dots.mean()),
    }


def held_out_cameras(cfg: Config, resolution: int, device: torch.device):
    from tdgen.render import orbit_cameras

    el, az = np.meshgrid(HELD_OUT_ELEVATIONS, HELD_OUT_AZIMUTHS, indexing="ij")
    return orbit_cameras(el.ravel(), az.ravel(), cfg.stage1.camera_radius, cfg.stage1.fovy,
                         resolution, resolution, device)


def view_metrics(pred: Mesh, pred_tex: np.ndarray, ref: Reference, cams) -> tuple[dict[str, float], Tensor, Tensor]:
    """Mask IoU and PSNR of unlit textured renders: `psnr` over the union of both silhouettes
    (shape and colour errors), `psnr_masked` over their intersection (texture only)."""
    from tdgen.raster import render_mesh

    bg = torch.tensor(METRIC_BACKGROUND, device=cams.device).expand(len(cams), 3)
    p_rgb, p_a = render_mesh(pred, torch.from_numpy(pred_tex).to(cams.device), cams, bg)
    r_rgb, r_a = render_mesh(ref.mesh, torch.from_numpy(ref.texture).to(cams.device), cams, bg)
    pm, rm = p_a[..., 0] > 0.5, r_a[..., 0] > 0.5  # [C, H, W]
    union, inter = pm | rm, pm & rm
    err = (p_rgb - r_rgb).pow(2).mean(-1)  # [C, H, W]

    def psnr(mask: Tensor) -> float:
        if not bool(mask.any()):
            return 0.0
        mse = float(err[mask].mean())
        return 10 * math.log10(1.0 / max(mse, 1e-10))

    iou = float(inter.sum() / union.sum().clamp_min(1))
    return {"mask_iou": iou, "psnr": psnr(union), "psnr_masked": psnr(inter)}, p_rgb, r_rgb


def measure_mesh(pred: Mesh, tex: np.ndarray, ref: Reference, cfg: Config, sizes: Sizes,
                 device: torch.device, image_path: Path | None = None) -> dict[str, float]:
    """Every metric of a textured mesh, already in the reference's frame, against the reference."""
    out = geometry_metrics(pred, ref.mesh, sizes.metric_points, seed=cfg.seed)
    cams = held_out_cameras(cfg, sizes.metric_resolution, device)
    views, p_rgb, r_rgb = view_metrics(pred, tex, ref, cams)
    out.update(views)
    out["triangles"] = int(len(pred.faces))
    if image_path is not None:
        save_comparison(p_rgb, r_rgb, image_path)
    return out


def topology_metrics(mesh: Mesh) -> dict[str, float]:
    """Connected pieces once UV seams are welded (vertices at the same position merged), whether
    that welded surface is watertight (every edge shared by exactly two faces) with consistent
    winding (and whether it is at least closed: no boundary edges), and its signed volume's sign (+1: faces wound outward)."""
    import trimesh

    tm = trimesh.Trimesh(mesh.vertices, mesh.faces, process=False)
    tm.merge_vertices(merge_tex=True, merge_norm=True)
    pieces = tm.split(only_watertight=False)
    _, uses = np.unique(tm.edges_sorted, axis=0, return_counts=True)
    return {
        "pieces": int(len(pieces)),
        "closed": bool((uses % 2 == 0).all()),  # no boundary edge, no hole
        "watertight": bool(tm.is_watertight),  # and every edge of exactly two faces
        "winding_consistent": bool(tm.is_winding_consistent),
        "outward": float(np.sign(tm.volume)) if tm.is_watertight else 0.0,
    }


def measure(glb: Path, ref: Reference, cfg: Config, sizes: Sizes, device: torch.device,
            image_path: Path | None = None) -> dict[str, float]:
    """Every metric of one exported asset against its reference."""
    pred, tex = read_glb_in_reference_frame(glb, ref, cfg.export.height)
    out = measure_mesh(pred, tex, ref, cfg, sizes, device, image_path)
    out.update(topology_metrics(pred))
    raw, _ = load_textured(glb)
    out["glb_height"] = float(np.ptp(raw.vertices[:, 1]))  # should equal export.height
    return out


def save_comparison(pred_rgb: Tensor, ref_rgb: Tensor, path: Path) -> None:
    """Reference renders on the top row, the reconstruction below (first 8 held-out views)."""
    from PIL import Image

    from tdgen.io import atomic_path

    rows = [torch.cat(list(x[:8].cpu()), dim=1) for x in (ref_rgb, pred_rgb)]
    img = (torch.cat(rows, dim=0).clamp(0, 1).numpy() * 255 + 0.5).astype(np.uint8)
    with atomic_path(path) as tmp:
        Image.fromarray(img).save(tmp, format="PNG")


def check_thresholds(case: str, metrics: dict[str, float], obj: str | None = None) -> list[str]:
    """The smoke thresholds `metrics` misses, e.g. ['chamfer 0.031 !< 0.02']; `obj` adds that
    reference's own tighter limits."""
    failed = []
    limits = {**SMOKE_THRESHOLDS[case], **SMOKE_OBJECT_THRESHOLDS.get((case, obj or ""), {})}
    for key, (op, limit) in limits.items():
        v = metrics.get(key)
        ok = v is not None and (v < limit if op == "<" else v > limit)
        if not ok:
            failed.append(f"{key} {v if v is None else round(v, 4)} !{op} {limit}")
    return failed


# ---------------------------------------------------------------------------------------------
# Driver


def run(refs: list[Reference], cases: list[str], cfg: Config, sizes: Sizes, device: torch.device,
        workdir: Path, smoke: bool, images: bool = False, detail: float = 0.0) -> list[dict[str, Any]]:
    rows = []
    for ref in refs:
        for case in cases:
            log(f"[quality] case {case} · {ref.name} …")
            t0 = time.perf_counter()
            row: dict[str, Any] = {"case": case, "object": ref.name}
            try:
                if case == "A":
                    glb, timings, counts = run_case_a(ref, cfg, sizes, workdir, device)
                else:
                    glb, timings, counts = run_case_b(ref, cfg, workdir, device, detail)
                img = workdir / f"{ref.name}_{case}.compare.png" if images else None
                row.update(measure(glb, ref, cfg, sizes, device, img))
                row["timings"] = {k: round(v, 3) for k, v in timings.items()}
                row["counts"] = counts
                row["glb"] = str(glb)
            except Exception as e:  # one broken case must not hide the others' numbers
                row["error"] = f"{type(e).__name__}: {e}"
            row["seconds"] = round(time.perf_counter() - t0, 2)
            if smoke:
                row["failed"] = [row["error"]] if "error" in row else check_thresholds(case, row, ref.name)
                row["passed"] = not row["failed"]
            log(f"[quality]   done in {row['seconds']} s")
            rows.append(row)
    return rows


TABLE = [
    ("case", "case", ""), ("object", "object", ""), ("chamfer", "chamfer/diag", ".4f"),
    ("fscore", "F@1%", ".3f"), ("normal_consistency", "NC", ".3f"), ("normal_agreement", "NC±", ".3f"),
    ("mask_iou", "IoU", ".3f"), ("psnr", "PSNR", ".2f"), ("psnr_masked", "PSNR∩", ".2f"),
    ("pieces", "pieces", ""), ("closed", "closed", ""), ("watertight", "manifold", ""), ("triangles", "tris", ""), ("seconds", "s", ".1f"), ("status", "status", ""),
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CI-sized CPU run with thresholds checked")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--ref", action="append", default=[], metavar="PATH",
                    help="textured .glb/.obj to use as a reference (repeatable)")
    ap.add_argument("--objects", default=None,
                    help=f"built-in references, comma-separated, of {','.join(BUILDERS)} (default: all; "
                         f"{','.join(SMOKE_OBJECTS)} with --smoke; none when --ref is given)")
    ap.add_argument("--cases", default="A,B", help="A (stage 2 alone), B (oracle pipeline), or A,B")
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    ap.add_argument("--workdir", type=Path, default=None, help="keep outputs here (default: a temp dir)")
    ap.add_argument("--images", action="store_true", help="write reference-vs-result PNGs in --workdir")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--detail", type=float, default=0.0, metavar="A",
                    help="case B: the oracle's colours get a ±A 3D pattern (0 = the references' own, "
                         "flat-coloured faces included)")
    ap.add_argument("--preset", default="standard", help="preset of the full-size run (not --smoke)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, e.g. mesh.method=density (repeatable)")
    args = ap.parse_args(argv)

    from tdgen.runtime import resolve_device

    set_threads(args.threads)
    device = resolve_device(args.device)
    cases = [c.strip().upper() for c in args.cases.split(",") if c.strip()]
    if not cases or any(c not in ("A", "B") for c in cases):
        ap.error(f"--cases must list A and/or B, got {args.cases!r}")
    default = list(SMOKE_OBJECTS) if args.smoke else list(BUILDERS)
    names = args.objects.split(",") if args.objects else ([] if args.ref else default)
    refs = [build_reference(n.strip()) for n in names if n.strip()] + [load_reference(p) for p in args.ref]
    if not refs:
        ap.error("nothing to measure: give --objects or --ref")
    from tdgen.config import parse_set_args

    cfg = quality_config(args.smoke, device, args.preset, parse_set_args(args.sets))
    sizes = SMOKE_SIZES if args.smoke else FULL_SIZES

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tdgen-quality-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        rows = run(refs, cases, cfg, sizes, device, workdir, args.smoke, images=args.images,
                   detail=args.detail)
    for r in rows:
        r["status"] = "ERROR" if "error" in r else ("ok" if r.get("passed", True) else "FAIL")
    print(format_table(rows, TABLE), file=sys.stderr)
    for r in rows:
        for f in r.get("failed", []) or ([r["error"]] if "error" in r else []):
            print(f"  {r['case']}/{r['object']}: {f}", file=sys.stderr)
    report = {
        "benchmark": "quality",
        "smoke": args.smoke,
        "environment": environment(device),
        "thresholds": ({**SMOKE_THRESHOLDS, **{f"{c}/{o}": t for (c, o), t in SMOKE_OBJECT_THRESHOLDS.items()}}
                       if args.smoke else None),
        "config": {"preset": None if args.smoke else args.preset, "sets": args.sets,
                   "mesh_method": cfg.mesh.method, "stage1_steps": cfg.stage1.steps, "stage1_resolution": cfg.stage1.resolution,
                   "mesh_grid": cfg.mesh.grid, "texture_size": cfg.texture.size,
                   "surface_gaussians": sizes.surface_gaussians,
                   "metric_resolution": sizes.metric_resolution},
        "results": rows,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if args.json:
        print(to_json(report))
    bad = any("error" in r for r in rows) or (args.smoke and not all(r.get("passed") for r in rows))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
