"""Speed benchmark: the real pipeline on the full-size SD 2.1-base architecture (random weights).

Cold start (model build, gsplat's JIT kernels, CUDA-graph capture, cuDNN autotuning) is reported
apart: each preset's first `generate` is a warm-up and is excluded from the warm numbers. The
warm runs are back-to-back `generate`s with the model loaded once, which also gives the batch
throughput (assets per hour). Random weights have the real model's FLOPs and memory, so times
transfer; the assets themselves are noise.

    python benchmarks/speed.py --device cuda --presets draft,standard --json-out speed.json
    python benchmarks/speed.py --device cuda --quick                 # fewer steps, same sizes
    python benchmarks/speed.py --device cuda --sds-only              # ms per SDS step variants
    python benchmarks/speed.py --device cpu --tiny [--sds-only]      # tiny model, seconds (tests)
    python benchmarks/speed.py --device cuda --mesh-only --presets standard  # stage 2's mesh part
    python benchmarks/speed.py --device cuda --cold-cli --presets standard  # fresh `tdgen make`s
    python benchmarks/speed.py --device cuda --step-breakdown --presets standard  # one SDS step's parts
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.common import (
    environment,
    format_table,
    log,
    peak_memory_gib,
    reset_peak_memory,
    set_threads,
    timed,
    to_json,
    write_json,
)
from tdgen.config import Config, resolve_config

PROMPTS = ("a wooden chair", "a red fire hydrant", "a ceramic teapot", "a treasure chest",
           "a potted cactus", "a viking helmet")
"""Distinct prompts for the runs (the text does not change the cost; distinct seeds do not either,
but they keep each run a fresh asset rather than a cached one)."""

QUICK = {"stage1.steps": 60, "texture.refine_steps": 8}
"""--quick: fewer iterations, same resolutions (per-step rates stay comparable)."""

TINY = {
    "stage1.steps": 6, "stage1.resolution": 64, "stage1.encode_resolution": 64,
    "stage1.num_points": 400, "stage1.max_points": 2000, "mesh.grid": 48, "mesh.views": 12,
    "mesh.view_resolution": 96, "mesh.triangles": 800,
    "texture.size": 64, "texture.bake_views": 6, "texture.bake_resolution": 64,
    "texture.refine_steps": 2, "texture.refine_resolution": 64, "texture.refine_ddim_steps": 10,
}
"""--tiny: the sizes of the tests' `tiny_config` (CPU, seconds)."""


# ---------------------------------------------------------------------------------------------
# Model


def build_model(args, device: torch.device, workdir: Path):
    """The benchmark model and how long it took: full-size random SD 2.1-base, or the tiny one."""
    from tdgen.guidance import resolve_dtype

    dtype = resolve_dtype(args.dtype, device)
    if args.tiny:
        from tdgen.config import ModelConfig
        from tdgen.guidance import load_model
        from tdgen.testing.tiny_model import write_tiny_model

        def build():
            folder = write_tiny_model(workdir / "tiny_model")
            return load_model(ModelConfig(id=str(folder), dtype=args.dtype), device)
    else:
        from tdgen.testing.full_model import build_full_sd21_base

        def build():
            return build_full_sd21_base(device, dtype, tiny_encoder=args.tiny_encoder,
                                        cuda_graphs=not args.no_graphs,
                                        compile_encoder=not args.no_compile,
                                        compile_decoder=not (args.no_compile or args.no_compile_decoder),
                                        compile_unet=args.compile_unet,
                                        vae_graphs=args.vae_graphs)

    return timed(build, device)


def tiny_autoencoder(model, device: torch.device):
    """An AutoencoderTiny for the SDS-encoder rows: TAESD-sized for the full model, a few channels
    for the tiny one (its cost should stay negligible on CPU, like the rest of that model)."""
    from tdgen.testing.full_model import build_tiny_autoencoder

    if model.tiny_vae is not None:
        return model.tiny_vae
    if "random:" in model.model_id:
        ae = build_tiny_autoencoder(device, model.dtype)
        if device.type == "cuda":  # as assemble_model does for a loaded tiny encoder
            ae.to(memory_format=torch.channels_last)
        return ae
    from diffusers import AutoencoderTiny

    with torch.device(device):
        ae = AutoencoderTiny(encoder_block_out_channels=(8, 8, 8, 8),
                             decoder_block_out_channels=(8, 8, 8, 8), num_encoder_blocks=(1, 1, 1, 1),
                             num_decoder_blocks=(1, 1, 1, 1))
    return torch.nn.Module.to(ae, dtype=model.dtype).eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# Pipeline runs


def one_run(prompt: str, cfg: Config, out: Path, device: torch.device, model) -> dict[str, Any]:
    from tdgen.pipeline import generate

    reset_peak_memory(device)
    res, wall = timed(lambda: generate(prompt, cfg, out, device=device, model=model), device)
    steps = res.counts.get("stage1_steps", cfg.stage1.steps)
    return {
        "prompt": prompt,
        "seconds": wall,
        "timings": dict(res.timings),  # stages, and sub-stages as "stage.part" (e.g. mesh.grid)
        "counts": dict(res.counts),
        "sds_steps_per_s": steps / res.timings["stage1"] if res.timings.get("stage1") else None,
        "peak_gib": peak_memory_gib(device),
    }


def bench_preset(preset: str, args, device: torch.device, model, workdir: Path) -> dict[str, Any]:
    sets: dict[str, Any] = {"model.id": model.model_id, "export.splat": False}
    if args.tiny:
        sets.update(TINY)
    if args.quick:
        sets.update({k: v for k, v in QUICK.items() if not args.tiny})
    if args.tiny_encoder:
        sets["model.sds_encoder"] = "tiny"
    for item in args.set:
        key, _, value = item.partition("=")
        sets[key] = value
    cfg = resolve_config(preset, sets)

    log(f"[speed] {preset}: warm-up run (cold start: JIT kernels, graph capture)")
    warm_up = one_run(PROMPTS[0], replace(cfg, seed=100), workdir / f"{preset}_warmup.glb", device, model)
    runs = []
    t0 = time.perf_counter()
    for i in range(args.runs):
        log(f"[speed] {preset}: run {i + 1}/{args.runs}")
        prompt = PROMPTS[(i + 1) % len(PROMPTS)]
        runs.append(one_run(prompt, replace(cfg, seed=i), workdir / f"{preset}_{i}.glb", device, model))
    batch_wall = time.perf_counter() - t0

    # Pipeline order as reported, sub-stages after their stage, the total last.
    stages = sorted({k for r in runs for k in r["timings"]},
                    key=lambda k: (k == "total", list(runs[0]["timings"]).index(k)
                                   if k in runs[0]["timings"] else 1e9))
    mean = lambda xs: statistics.fmean(xs) if xs else None  # noqa: E731
    warm_total = mean([r["timings"]["total"] for r in runs])
    return {
        "preset": preset,
        "config": {"stage1_steps": cfg.stage1.steps, "resolution": cfg.stage1.resolution,
                   "encode_resolution": cfg.stage1.encode_resolution, "mesh_grid": cfg.mesh.grid,
                   "triangles": cfg.mesh.triangles, "texture_size": cfg.texture.size,
                   "refine_steps": cfg.texture.refine_steps, "quick": args.quick, "tiny": args.tiny},
        "warm_up": warm_up,
        "cold_overhead_s": warm_up["timings"]["total"] - warm_total if warm_total else None,
        "runs": runs,
        "stage_seconds": {k: mean([r["timings"][k] for r in runs if k in r["timings"]]) for k in stages},
        "total_s": warm_total,
        "sds_steps_per_s": mean([r["sds_steps_per_s"] for r in runs if r["sds_steps_per_s"]]),
        "peak_gib": max((r["peak_gib"] or 0.0) for r in runs) if device.type == "cuda" else None,
        "batch": {"assets": len(runs), "seconds": batch_wall,
                  "assets_per_hour": 3600 * len(runs) / batch_wall if batch_wall > 0 else None},
    }


def pipeline_table(results: list[dict[str, Any]]) -> str:
    keys: list[str] = []
    for r in results:
        keys += [k for k in r["stage_seconds"] if k not in keys and k != "total"]
    rows = []
    for k in keys:
        label = "  " + k if "." in k else k  # sub-stages indented under their stage
        rows.append({"what": label, **{r["preset"]: r["stage_seconds"].get(k) for r in results}})
    extra = [
        ("total to .glb (s)", "total_s"), ("SDS steps/s", "sds_steps_per_s"),
        ("peak GPU memory (GiB)", "peak_gib"), ("cold overhead, first run (s)", "cold_overhead_s"),
    ]
    for label, key in extra:
        rows.append({"what": label, **{r["preset"]: r[key] for r in results}})
    rows.append({"what": "batch assets/hour", **{r["preset"]: r["batch"]["assets_per_hour"] for r in results}})
    cols = [("what", "seconds (mean of warm runs)", "")] + [(r["preset"], r["preset"], ".3f") for r in results]
    return format_table(rows, cols)


# ---------------------------------------------------------------------------------------------
# Stage-2 mesh part alone (issue target: ≤ 1 s on the GPU at standard)

MESH_OBJECTS = ("chair", "mug", "rock")
"""Known-answer references whose 60k-surfel splats (quality.py's case A) are meshed."""

MESH_TABLE = [("preset", "preset", ""), ("object", "object", ""), ("method", "surface", ""),
              ("grid_s", "grid", ".3f"), ("marching_cubes_s", "mc", ".3f"), ("clean_s", "clean", ".3f"),
              ("decimate_s", "decimate", ".3f"), ("mesh_s", "mesh", ".3f"), ("triangles", "tris", "d")]


def bench_mesh(presets: list[str], device: torch.device, runs: int, sets: list[str]) -> list[dict[str, Any]]:
    """`extract_mesh` on 60k flat surfels per reference and preset: the median of `runs` warm
    runs (the first call per preset is a warm-up), split into its parts as the pipeline does."""
    from benchmarks.quality import gaussians_on_surface
    from benchmarks.references import build_reference
    from tdgen.config import parse_set_args
    from tdgen.gaussians import normalize_splat
    from tdgen.mesh import extract_mesh
    from tdgen.pipeline import _MeshClock

    splats = {name: normalize_splat(gaussians_on_surface(build_reference(name), 60_000, seed=0))
              for name in MESH_OBJECTS}
    rows = []
    for preset in presets:
        cfg = resolve_config(preset, parse_set_args(sets)).mesh
        warm = False
        for name, g in splats.items():
            runs_t: list[dict[str, float]] = []
            for _ in range(runs + (0 if warm else 1)):
                timings: dict[str, float] = {}
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                mesh = extract_mesh(g, cfg, device, on_progress=_MeshClock(lambda p: None, timings))
                timings["mesh"] = time.perf_counter() - t0
                runs_t.append(timings)
            runs_t = runs_t[-runs:]
            warm = True
            med = {k: statistics.median(t.get(k, 0.0) for t in runs_t) for k in runs_t[0]}
            rows.append({"preset": preset, "object": name, "method": cfg.method,
                         **{f"{k.removeprefix('mesh.')}_s": round(v, 4) for k, v in med.items()},
                         "triangles": mesh.num_faces, "runs": runs})
            log(f"[speed] mesh {preset} {name}: {med['mesh']:.3f} s")
    return rows


# ---------------------------------------------------------------------------------------------
# SDS micro-benchmark


def sds_variants(device: torch.device, resolution: int) -> list[dict[str, Any]]:
    """The rows the lead chooses defaults from: each differs from the first in one knob."""
    # Stage 1 renders at 1/4, 1/2 and the full size (DreamGaussian's 128 → 256 → 512).
    low = max(16, resolution // 2)
    lowest = max(16, resolution // 4)
    graphs = device.type == "cuda"
    return [
        {"name": "eager UNet, VAE, encode at render res", "graphs": False, "encoder": "vae",
         "render": resolution, "encode": 0},
        {"name": "CUDA graph UNet, VAE", "graphs": graphs, "encoder": "vae", "render": resolution, "encode": 0},
        {"name": "CUDA graph UNet, tiny encoder", "graphs": graphs, "encoder": "tiny",
         "render": resolution, "encode": 0},
        {"name": f"render {low}, encode at {resolution}", "graphs": graphs, "encoder": "vae",
         "render": low, "encode": resolution},
        {"name": f"render {low}, encode at render res", "graphs": graphs, "encoder": "vae",
         "render": low, "encode": 0},
        {"name": f"render {lowest}, encode at {resolution}", "graphs": graphs, "encoder": "vae",
         "render": lowest, "encode": resolution},
        {"name": f"render {lowest}, encode at render res", "graphs": graphs, "encoder": "vae",
         "render": lowest, "encode": 0},
        {"name": f"render {lowest}, tiny encoder at render res", "graphs": graphs, "encoder": "tiny",
         "render": lowest, "encode": 0},
        # Image-space SDS (stage1.sds_space=image) once it has switched on: encoder forward
        # without grad, CFG UNet, one full VAE decode of x̂0; no encoder backward.
        {"name": "CUDA graph UNet, VAE, image-space SDS, eager decoder", "graphs": graphs,
         "encoder": "vae", "render": resolution, "encode": 0, "space": "image", "decoder": "eager"},
        {"name": "CUDA graph UNet, VAE, image-space SDS, compiled decoder", "graphs": graphs,
         "encoder": "vae", "render": resolution, "encode": 0, "space": "image",
         "decoder": "compiled"},
        {"name": "CUDA graph of the compiled UNet, VAE, image-space SDS, compiled decoder",
         "graphs": graphs, "encoder": "vae", "render": resolution, "encode": 0, "space": "image",
         "decoder": "compiled", "unet": "compiled"},
        {"name": "CUDA graph UNet, tiny encoder, image-space SDS, compiled decoder",
         "graphs": graphs, "encoder": "tiny", "render": resolution, "encode": 0, "space": "image",
         "decoder": "compiled"},
    ]


def bench_sds(model, device: torch.device, resolution: int, steps: int, warmup: int,
              only: str = "") -> list[dict[str, Any]]:
    """ms per SDS step (encoder forward, CFG UNet, encoder backward; no Gaussian render) per row."""
    from tdgen.config import Stage1Config
    from tdgen.guidance import SDSGuidance, encode_prompt
    from tdgen.runtime import make_generator

    emb = encode_prompt(model, PROMPTS[0])
    tiny = tiny_autoencoder(model, device)
    own_tiny, own_graphs, own_dec = model.tiny_vae, model.cuda_graphs, model.compile_decoder
    own_unet = model.compile_unet
    rows = []
    try:
        for v in sds_variants(device, resolution):
            if only and only not in v["name"]:
                continue
            model.cuda_graphs = v["graphs"]
            model.tiny_vae = tiny if v["encoder"] == "tiny" else None
            if "decoder" in v:
                model.compile_decoder = own_dec and v["decoder"] == "compiled"
            want_unet = v.get("unet") == "compiled" and device.type == "cuda"
            if model.compile_unet != want_unet:
                # The captured graphs hold whichever UNet ran when they were captured.
                model.compile_unet = want_unet
                model.graphs.clear()
            cfg = Stage1Config(encode_resolution=v["encode"], sds_space=v.get("space", "latent"),
                               sds_image_start=0.0)
            sds = SDSGuidance(model, emb, cfg, make_generator(0, device))
            gen = make_generator(1, device)
            img = torch.rand(1, 3, v["render"], v["render"], generator=gen, device=device,
                             requires_grad=True)  # [1, 3, H, W] stands in for a render
            cams = SimpleNamespace(azimuth=torch.zeros(1, device=device),
                                   elevation=torch.zeros(1, device=device))
            bg = torch.ones(1, 3, device=device)

            def step(i: int) -> None:
                img.grad = None
                sds.loss(img, cams, bg, (i % 100) / 100).backward()

            reset_peak_memory(device)
            _, cold = timed(lambda: [step(i) for i in range(warmup)], device)
            _, sec = timed(lambda: [step(i) for i in range(steps)], device)
            rows.append({**v, "space": v.get("space", "latent"), "encode": v["encode"] or v["render"],
                         "ms_per_step": 1000 * sec / steps,
                         "steps_per_s": steps / sec, "warmup_s": cold, "peak_gib": peak_memory_gib(device),
                         "grad_finite": bool(torch.isfinite(img.grad).all())})
            log(f"[speed] sds: {v['name']}: {rows[-1]['ms_per_step']:.2f} ms/step")
    finally:
        model.tiny_vae, model.cuda_graphs, model.compile_decoder = own_tiny, own_graphs, own_dec
        if model.compile_unet != own_unet:
            model.compile_unet = own_unet
            model.graphs.clear()
    return rows


def bench_refine(model, device: torch.device, ddim_steps: list[int], steps: int,
                 tiny: bool = False) -> list[dict[str, Any]]:
    """Texture refinement alone (`standard`'s texture settings, `steps` steps; `tiny`: 64 px) on
    a UV-unwrapped 20k-face sphere, once per DDIM schedule length: what
    `texture.refine_ddim_steps` costs."""
    import numpy as np
    import trimesh

    from tdgen.config import TextureConfig
    from tdgen.guidance import encode_prompt
    from tdgen.meshdata import Mesh
    from tdgen.refine import refine_texture
    from tdgen.runtime import make_generator
    from tdgen.unwrap import unwrap_mesh

    m = trimesh.creation.icosphere(subdivisions=5, radius=0.5)  # 20 480 faces
    mesh = unwrap_mesh(Mesh(m.vertices.astype(np.float32), m.faces.astype(np.int64),
                            m.vertex_normals.astype(np.float32)), TextureConfig())
    emb = encode_prompt(model, PROMPTS[0])
    base = TextureConfig(size=64, refine_resolution=64) if tiny else TextureConfig()
    tex = torch.full((base.size, base.size, 3), 0.5)
    rows = []
    for n in ddim_steps:
        cfg = replace(base, refine_steps=steps, refine_ddim_steps=n)

        def run(c=cfg):
            return refine_texture(mesh, tex, model, emb, c, device, make_generator(0, device))

        timed(lambda: run(replace(cfg, refine_steps=3)), device)  # warm-up: compile, graphs
        reset_peak_memory(device)
        _, sec = timed(run, device)
        rows.append({"ddim_steps": n, "refine_steps": steps, "seconds": sec,
                     "peak_gib": peak_memory_gib(device)})
        log(f"[speed] refine, DDIM {n}: {sec:.2f} s for {steps} steps")
    return rows


SDS_TABLE = [("name", "variant", ""), ("graphs", "graph used", ""), ("space", "SDS space", ""),
             ("render", "render", ""),
             ("encode", "encode", ""),
             ("ms_per_step", "ms/step", ".2f"), ("steps_per_s", "steps/s", ".1f"),
             ("warmup_s", "warm-up s", ".2f"), ("peak_gib", "peak GiB", ".2f")]


# ---------------------------------------------------------------------------------------------
# A fresh `tdgen make` process, and one SDS step taken apart


CLI = (sys.executable, "-c", "import sys; from tdgen.cli import main; sys.exit(main())")
"""The installed `tdgen` entry point, spelled so it also runs from a checkout on PYTHONPATH."""


def _wall(cmd: list[str], **kw) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    return proc, time.perf_counter() - t0


def bench_cold_cli(preset: str, sets: list[str], runs: int, workdir: Path,
                   tiny: bool = False) -> dict[str, Any]:
    """Process wall time of `tdgen make --model FOLDER` in fresh processes: the full-size
    architecture saved as a diffusers folder of safetensors and loaded the way a real model is.

    The first make is a priming run (it fills the page cache, the folder's fingerprint cache and
    gsplat's kernel build if missing); the rest are what a user's second and later runs cost."""
    from benchmarks.batch_speed import write_full_model

    t0 = time.perf_counter()
    if tiny:
        from tdgen.testing.tiny_model import write_tiny_model

        folder = write_tiny_model(workdir / "cli_model")
    else:
        folder = write_full_model(workdir / "cli_model", torch.float16)
    write_s = time.perf_counter() - t0
    torch.cuda.empty_cache()
    extra = [a for s in sets for a in ("--set", s)]
    small = {}
    for name, args in (("help", ["--help"]), ("presets", ["presets"])):
        proc, sec = _wall([*CLI, *args])
        small[f"{name}_s"] = sec
    proc, sec = _wall([sys.executable, "-c", "import torch, tdgen.pipeline, tdgen.guidance"])
    small["import_s"] = sec
    makes = []
    for i in range(runs + 1):
        out = workdir / f"cli_{i}.glb"
        proc, sec = _wall([*CLI, "make", PROMPTS[i % len(PROMPTS)], "-o", str(out), "--model",
                           str(folder), "--preset", preset, "--seed", str(i), "--json", *extra],
                           env={**os.environ, "TDGEN_CACHE_DIR": str(workdir / "cache")})
        if proc.returncode != 0:
            raise RuntimeError(f"tdgen make failed ({proc.returncode}): {proc.stderr[-2000:]}")
        # The result is the last JSON line: libraries may print their own lines before it.
        lines = [ln for ln in proc.stdout.splitlines() if ln.strip().startswith("{")]
        if not lines:
            raise RuntimeError(f"tdgen make printed no JSON result; stdout: {proc.stdout[:2000]!r}")
        timings = json.loads(lines[-1]).get("timings", {})
        others = [ln for ln in proc.stdout.splitlines() if ln.strip() and ln not in lines]
        if others:
            log(f"[speed] tdgen make also printed on stdout: {others[:5]}")
        inside = timings.get("total", 0.0)
        makes.append({"priming": i == 0, "process_s": sec, "timings": timings,
                      "outside_generate_s": sec - inside})
        log(f"[speed] cold cli {preset} {'priming' if i == 0 else i}: {sec:.1f} s process, "
            f"load {timings.get('load', float('nan')):.1f} s")
    timed_runs = [m for m in makes if not m["priming"]]
    return {"preset": preset, "model_write_s": write_s, **small, "makes": makes,
            "process_s": statistics.fmean(m["process_s"] for m in timed_runs),
            "load_s": statistics.fmean(m["timings"].get("load", 0.0) for m in timed_runs)}


def bench_step_breakdown(model, device: torch.device, preset: str, sets: list[str], gaussians: int,
                         steps: int) -> dict[str, Any]:
    """One stage-1 step at the preset's final render size, phase by phase with a device sync
    between phases (so the phases add up to a step without overlap), plus the top CUDA kernels of
    the same steps from torch.profiler: what bounds an SDS step."""
    from tdgen.gaussians import Gaussians, init_ball
    from tdgen.guidance import SDSGuidance, encode_prompt
    from tdgen.render import render_gaussians, sample_orbit_cameras
    from tdgen.runtime import make_generator

    cfg = resolve_config(preset, dict(s.partition("=")[::2] for s in sets) | {"model.id": model.model_id})
    s1 = cfg.stage1
    gen = make_generator(0, device)
    g0 = init_ball(gaussians, s1.init_radius, s1.init_opacity, gen).to(device)
    params = [t.requires_grad_(True) for t in (g0.means, g0.scales, g0.quats, g0.opacities, g0.sh0)]
    opt = torch.optim.Adam(params, lr=1e-3, eps=1e-15)
    sds = SDSGuidance(model, encode_prompt(model, PROMPTS[0]), s1, make_generator(1, device))
    bg = torch.ones(s1.batch_size, 3, device=device)
    phases = ("render", "encode", "unet_cfg", "backward", "adam")
    times: dict[str, list[float]] = {p: [] for p in phases}

    def step(i: int, clock: bool) -> None:
        marks = [time.perf_counter()]

        def mark() -> None:
            if clock and device.type == "cuda":
                torch.cuda.synchronize(device)
            marks.append(time.perf_counter())

        cams = sample_orbit_cameras(s1.batch_size, s1, s1.resolution, gen).to(device)
        g = Gaussians(*params, params[4].new_zeros(gaussians, 0, 3))
        out = render_gaussians(g, cams, bg)
        mark()
        latents = sds.encode_images(out.rgb.permute(0, 3, 1, 2))
        mark()
        loss = sds.latent_loss(latents, cams.azimuth, 0.5 + 0.4 * (i % 10) / 10)
        mark()
        loss.backward()
        mark()
        opt.step()
        opt.zero_grad(set_to_none=True)
        mark()
        if clock:
            for p, a, b in zip(phases, marks, marks[1:]):
                times[p].append(1000 * (b - a))

    for i in range(5):
        step(i, clock=True)
    times = {p: [] for p in phases}
    for i in range(steps):
        step(i, clock=True)
    _, free = timed(lambda: [step(i, clock=False) for i in range(steps)], device)
    kernels = []
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for i in range(10):
                step(i, clock=False)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        rows = sorted(prof.key_averages(), key=lambda e: -getattr(e, "device_time_total", 0.0))
        total = sum(getattr(e, "self_device_time_total", 0.0) for e in rows) or 1.0
        kernels = [{"name": e.key[:120], "ms_per_step": getattr(e, "self_device_time_total", 0.0) / 1e3 / 10,
                    "share": getattr(e, "self_device_time_total", 0.0) / total, "calls_per_step": e.count / 10}
                   for e in sorted(rows, key=lambda e: -getattr(e, "self_device_time_total", 0.0))[:25]]
    except Exception as exc:  # the profiler is a diagnostic: its absence must not lose the phases
        kernels = [{"error": repr(exc)}]
    med = {p: statistics.median(v) for p, v in times.items()}
    return {"preset": preset, "gaussians": gaussians, "resolution": s1.resolution,
            "encode_resolution": s1.encode_resolution or s1.resolution, "batch_size": s1.batch_size,
            "phases_ms": med, "phases_sum_ms": sum(med.values()),
            "step_ms_without_syncs": 1000 * free / steps, "top_kernels": kernels}


# ---------------------------------------------------------------------------------------------
# Driver


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto, cuda or cpu")
    ap.add_argument("--presets", default="draft,standard", help="comma-separated preset names")
    ap.add_argument("--runs", type=int, default=2, help="warm runs per preset (also the batch size)")
    ap.add_argument("--quick", action="store_true", help=f"fewer iterations ({QUICK})")
    ap.add_argument("--tiny", action="store_true", help="the tiny random model at test sizes (CPU)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "fp16", "bf16", "fp32"])
    ap.add_argument("--no-graphs", action="store_true", help="pipeline runs without CUDA graphs")
    ap.add_argument("--compile-unet", action="store_true",
                    help="the UNet through torch.compile too (model.compile_unet=true)")
    ap.add_argument("--no-compile", action="store_true", help="VAE encoder and decoder eager (model.compile_encoder=false, compile_decoder=false)")
    ap.add_argument("--no-compile-decoder", action="store_true",
                    help="VAE decoder eager (model.compile_decoder=false), the encoder as --no-compile says")
    ap.add_argument("--vae-graphs", action="store_true",
                    help="VAE encoder and decoder replayed from CUDA graphs (model.vae_graphs=true)")
    ap.add_argument("--tiny-encoder", action="store_true",
                    help="pipeline runs with the tiny SDS encoder (model.sds_encoder = tiny)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra setting for every preset (repeatable)")
    ap.add_argument("--sds-only", action="store_true", help="only the per-step SDS micro-benchmark")
    ap.add_argument("--refine-only", action="store_true",
                    help="only texture refinement on a fixed mesh, DDIM 50 against 25")
    ap.add_argument("--mesh-only", action="store_true",
                    help=f"only stage 2's mesh part on 60k-surfel splats of {', '.join(MESH_OBJECTS)}")
    ap.add_argument("--cold-cli", action="store_true",
                    help="fresh `tdgen make --model FOLDER` processes (process wall, load, per stage)")
    ap.add_argument("--step-breakdown", action="store_true",
                    help="one stage-1 step phase by phase, and its top CUDA kernels")
    ap.add_argument("--gaussians", type=int, default=20000, help="--step-breakdown: Gaussians rendered")
    ap.add_argument("--sds-steps", type=int, default=None, help="timed SDS steps per row (default 30, tiny 3)")
    ap.add_argument("--sds-rows", default="", help="--sds-only: only the rows whose name contains this")
    ap.add_argument("--sds-resolution", type=int, default=None, help="SDS render size (default 512, tiny 64)")
    ap.add_argument("--json-out", type=Path, default=None, help="write the report here as JSON")
    ap.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = ap.parse_args(argv)
    if args.runs < 1:
        ap.error("--runs must be at least 1")

    from tdgen.runtime import resolve_device

    set_threads(args.threads)
    device = resolve_device(args.device)
    report: dict[str, Any] = {"benchmark": "speed", "environment": environment(device),
                              "model": "tiny random (diffusers layout)" if args.tiny
                              else "random-weight SD 2.1-base (full size)"}
    t_all = time.perf_counter()
    if args.cold_cli:
        presets = [p.strip() for p in args.presets.split(",") if p.strip()]
        with tempfile.TemporaryDirectory(prefix="tdgen-cli-") as tmp:
            report["cold_cli"] = [bench_cold_cli(p, args.set, args.runs, Path(tmp), args.tiny) for p in presets]
    elif args.mesh_only:
        presets = [p.strip() for p in args.presets.split(",") if p.strip()]
        report["model"] = None
        report["mesh"] = bench_mesh(presets, device, args.runs, args.set)
        print(format_table(report["mesh"], MESH_TABLE), file=sys.stderr)
    else:
        _bench_model(args, device, report)
    report["seconds"] = time.perf_counter() - t_all
    if args.json_out:
        write_json(args.json_out, report)
        log(f"[speed] wrote {args.json_out}")
    if args.json:
        print(to_json(report))
    return 0


def _bench_model(args, device: torch.device, report: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory(prefix="tdgen-speed-") as tmp:
        workdir = Path(tmp)
        log("[speed] building the model …")
        model, build_s = build_model(args, device, workdir)
        report["cold_start"] = {"model_build_s": build_s}
        report["dtype"] = str(model.dtype).removeprefix("torch.")
        report["cuda_graphs"] = model.cuda_graphs
        report["vae_graphs"] = model.vae_graphs

        if args.step_breakdown:
            presets = [p.strip() for p in args.presets.split(",") if p.strip()]
            report["step_breakdown"] = [
                bench_step_breakdown(model, device, p, args.set, args.gaussians, args.sds_steps or 20)
                for p in presets]
            log(to_json(report["step_breakdown"]))
        elif args.refine_only:
            report["refine"] = bench_refine(model, device, [50, 25], 3 if args.tiny else 50, args.tiny)
        elif args.sds_only:
            res = args.sds_resolution or (64 if args.tiny else 512)
            steps = args.sds_steps or (3 if args.tiny else 30)
            rows = bench_sds(model, device, res, steps, warmup=1 if args.tiny else 5,
                             only=args.sds_rows)
            report["sds"] = {"resolution": res, "steps": steps, "rows": rows}
            print(format_table(rows, SDS_TABLE), file=sys.stderr)
        else:
            presets = [p.strip() for p in args.presets.split(",") if p.strip()]
            results = [bench_preset(p, args, device, model, workdir) for p in presets]
            first = results[0]
            # Everything a fresh process pays once before its first asset comes out at warm speed.
            report["cold_start"]["first_run_overhead_s"] = first["cold_overhead_s"]
            # Clamped: on a noisy CPU a warm-up can beat the warm run by a little.
            report["cold_start"]["total_s"] = build_s + max(0.0, first["cold_overhead_s"] or 0.0)
            report["presets"] = results
            print(pipeline_table(results), file=sys.stderr)
            print(f"cold start: model build {build_s:.2f} s + first-run overhead "
                  f"{first['cold_overhead_s'] or 0.0:.2f} s", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
