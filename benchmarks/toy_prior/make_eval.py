"""`eval`: `tdgen make --model FOLDER` per toy object (the real CLI, in a subprocess), then the
`.glb` and the stage-1 `.ply` measured against the known object.

Reported per object: the splat's silhouette IoU over 16 held-out views against the object and
against it turned 180° (higher on the second = back to front), the `.glb`'s mask IoU / PSNR /
Chamfer / F-score as `benchmarks/quality.py` measures them, and the mean colour error of the
textured `.glb` where both silhouettes overlap. A contact sheet shows reference over result.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.toy_prior.objects import PROMPTS, build_object, turned

SCALED = {
    # The project's defaults with every render size scaled from SD's 512 to the prior's image.
    "stage1.resolution": "{image}",
    "stage1.encode_resolution": "{image}",
    "texture.bake_resolution": "{image}",
    "texture.refine_resolution": "{image}",
    "texture.size": "{texture}",
}


def scaled_sets(image: int) -> dict[str, str]:
    return {k: v.format(image=image, texture=max(256, 2 * image)) for k, v in SCALED.items()}


def _prior_image(model: Path) -> int:
    return int(json.loads((Path(model) / "toy_prior.json").read_text())["size"]["image"])


def make_one(model: Path, obj: str, out: Path, device: str, sets: dict, preset: str,
             seed: int) -> dict:
    """Run `tdgen make` for the object's prompt; returns its JSON result (+ wall seconds)."""
    return _run_cli(["make", PROMPTS[obj], "--out", str(out)], model, device, sets, preset, seed)


def retexture_one(model: Path, obj: str, splat: Path, out: Path, device: str, sets: dict,
                  preset: str, seed: int) -> dict:
    """Run `tdgen mesh SPLAT --prompt` (stage 2 with refinement against the prior) for the
    object's prompt; returns its JSON result (+ wall seconds)."""
    return _run_cli(["mesh", str(splat), "--out", str(out), "--prompt", PROMPTS[obj]], model,
                    device, sets, preset, seed)


def _run_cli(head: list[str], model: Path, device: str, sets: dict, preset: str,
             seed: int) -> dict:
    cmd = [sys.executable, "-m", "tdgen.cli", *head, "--model", str(model), "--preset", preset,
           "--seed", str(seed), "--device", device, "--json"]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    t0 = time.perf_counter()
    # `python -m` puts the working directory first on sys.path: run from this checkout so the
    # tdgen measured is the one beside this benchmark, not whatever the caller's cwd holds.
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root)
    if proc.returncode != 0:
        raise RuntimeError(f"tdgen {head[0]} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip().startswith("{")]
    res = json.loads(lines[-1]) if lines else {}
    return {"cli": res, "wall_s": round(time.perf_counter() - t0, 1), "cmd": " ".join(cmd[2:])}


@torch.no_grad()
def colour_error(pred, tex: np.ndarray, ref, cams) -> float:
    """Mean |Δrgb| of unlit renders where both silhouettes cover the pixel."""
    from tdgen.raster import render_mesh

    bg = torch.full((len(cams), 3), 0.5, device=cams.device)
    p, pa = render_mesh(pred, torch.from_numpy(tex), cams, bg)
    r, ra = render_mesh(ref.mesh, torch.from_numpy(ref.texture), cams, bg)
    both = (pa[..., 0] > 0.5) & (ra[..., 0] > 0.5)
    return float((p - r).abs().mean(-1)[both].mean()) if bool(both.any()) else 1.0


def measure_object(obj: str, glb: Path, ply: Path | None, cfg, device, sheet: Path | None) -> dict:
    from benchmarks.quality import Sizes, measure, read_glb_in_reference_frame
    from benchmarks.toy_prior.evaluate import held_out_cameras, silhouette_iou
    from tdgen.gaussians import load_ply

    ref = build_object(obj)
    sizes = Sizes(surface_gaussians=0, metric_points=20_000, metric_resolution=128)
    row = {"object": obj}
    cams = held_out_cameras(128, cfg.stage1, device)
    if ply is not None and ply.exists():
        g = load_ply(ply)
        row["splat_iou"] = silhouette_iou(g, ref, cams)
        row["splat_iou_turned"] = silhouette_iou(g, turned(ref), cams)
    m = measure(glb, ref, cfg, sizes, torch.device(device), sheet)
    row.update({k: m[k] for k in ("mask_iou", "psnr", "psnr_masked", "chamfer", "fscore")})
    pred, tex = read_glb_in_reference_frame(glb, ref, cfg.export.height)
    row["colour_error"] = colour_error(pred, tex, ref, cams)
    return row


def run_eval(model: Path, objects: list[str], workdir: Path, device: str, extra: dict,
             preset: str = "standard", seed: int = 0) -> list[dict]:
    from tdgen.config import resolve_config

    workdir.mkdir(parents=True, exist_ok=True)
    sets = {**scaled_sets(_prior_image(model)), "export.splat": "true", **{k: str(v) for k, v
                                                                              in extra.items()}}
    # The same strings the CLI parses, and the model folder's own settings (its tdgen.toml).
    cfg = resolve_config(preset, {**sets, "model.id": str(model)})
    rows = []
    for obj in objects:
        glb = workdir / f"{obj}.glb"
        try:
            made = make_one(model, obj, glb, device, sets, preset, seed)
            row = measure_object(obj, glb, glb.with_suffix(".ply"), cfg, device,
                                 workdir / f"{obj}.compare.png")
            row.update(wall_s=made["wall_s"], timings=made["cli"].get("timings"),
                       guidance_scale=cfg.stage1.guidance_scale)
        except Exception as e:  # one failure must not hide the other objects' numbers
            row = {"object": obj, "error": f"{type(e).__name__}: {e}"}
        print(json.dumps(row), flush=True)
        rows.append(row)
    contact_sheet(workdir)
    return rows


def run_retexture(model: Path, obj: str, splat: Path, workdir: Path, device: str,
                  variants: dict[str, dict], seeds: list[int],
                  preset: str = "standard") -> list[dict]:
    """One stage-1 splat textured again per variant (extra `--set`s) and refinement seed; each
    `.glb` measured as `run_eval` measures it (no splat IoU: the splat is the same)."""
    from tdgen.config import resolve_config

    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, extra in variants.items():
        sets = {**scaled_sets(_prior_image(model)), **{k: str(v) for k, v in extra.items()}}
        cfg = resolve_config(preset, sets)
        for seed in seeds:
            glb = workdir / f"{obj}_{name}_s{seed}.glb"
            try:
                made = retexture_one(model, obj, splat, glb, device, sets, preset, seed)
                row = {"variant": name, "seed": seed,
                       **measure_object(obj, glb, None, cfg, device,
                                        glb.with_suffix(".compare.png")),
                       "refine_s": (made["cli"].get("timings") or {}).get("refine"),
                       "wall_s": made["wall_s"]}
            except Exception as e:  # one failure must not hide the other variants' numbers
                row = {"variant": name, "seed": seed, "object": obj,
                       "error": f"{type(e).__name__}: {e}"}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def contact_sheet(workdir: Path) -> None:
    """Stack every object's reference-over-result strip in `workdir` into contact.png."""
    from PIL import Image

    strips = [np.asarray(Image.open(p)) for p in sorted(workdir.glob("*.compare.png"))]
    if strips:
        Image.fromarray(np.concatenate(strips, 0)).save(workdir / "contact.png")
