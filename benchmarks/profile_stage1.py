"""Where a warm stage-1 step of the pipeline goes: torch.profiler over the real loop, CPU and CUDA.

`speed.py --step-breakdown` times a synthetic step with a device sync between phases; this runs
`optimize_gaussians` itself (densifier, host syncs, resolution schedule, image-space SDS) on the
full-size SD-2.1-base architecture with random weights, after a warm-up run, and reports:

- the wall time of every step (no profiler), summarised per phase of the schedule;
- over a profiled window of steps: how long the GPU was busy (union of kernel intervals), how long
  the host waited in syncs, and the CPU and GPU time of each part of the loop (labelled here by
  wrapping the functions the loop calls; the library itself carries no profiling code).

    python benchmarks/profile_stage1.py --device cuda [--preset standard] [--window 420:440]
        [--json-out FILE] [--trace FILE.json.gz]
"""

from __future__ import annotations

import argparse
import functools
import gzip
import json
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

LABELS = ("cameras", "render", "sds", "sds.encode", "sds.unet", "sds.decode", "backward",
          "strategy.pre", "strategy.post", "adam")


def _labelled(name: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.profiler.record_function(name):
            return fn(*args, **kwargs)
    return wrapper


def install_labels() -> None:
    """Wrap what the stage-1 loop calls in record_function ranges (this process only)."""
    from gsplat.strategy import DefaultStrategy

    import tdgen.guidance as guidance
    import tdgen.model as model
    import tdgen.optimize as optimize

    optimize.render_gaussians = _labelled("render", optimize.render_gaussians)
    optimize.sample_orbit_cameras = _labelled("cameras", optimize.sample_orbit_cameras)
    guidance.SDSGuidance.loss = _labelled("sds", guidance.SDSGuidance.loss)
    guidance.predict_noise_cfg = _labelled("sds.unet", guidance.predict_noise_cfg)
    model.DiffusionModel.latent_dist = _labelled("sds.encode", model.DiffusionModel.latent_dist)
    model.DiffusionModel.decode = _labelled("sds.decode", model.DiffusionModel.decode)
    DefaultStrategy.step_pre_backward = _labelled("strategy.pre", DefaultStrategy.step_pre_backward)
    DefaultStrategy.step_post_backward = _labelled("strategy.post", DefaultStrategy.step_post_backward)
    torch.Tensor.backward = _labelled("backward", torch.Tensor.backward)
    torch.optim.Adam.step = _labelled("adam", torch.optim.Adam.step)


def run_stage1(model, cfg, device, on_progress=None):
    from tdgen.guidance import SDSGuidance, encode_prompt
    from tdgen.optimize import optimize_gaussians
    from tdgen.progress import no_progress
    from tdgen.runtime import make_generator

    emb = encode_prompt(model, "a wooden chair", cfg.stage1.negative_prompt, cfg.stage1.view_prompts)
    gen = make_generator(cfg.seed, device)
    sds = SDSGuidance(model, emb, cfg.stage1, gen)
    t0 = time.perf_counter()
    res = optimize_gaussians(sds, cfg.stage1, device, gen, on_progress=on_progress or no_progress)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return res, time.perf_counter() - t0


def step_walls(model, cfg, device) -> list[float]:
    """ms per step; on_progress runs after the step's host sync, so consecutive calls bound it."""
    marks = [time.perf_counter()]
    run_stage1(model, cfg, device, lambda p: marks.append(time.perf_counter()))
    return [1000 * (b - a) for a, b in zip(marks, marks[1:])]


def phases(walls: list[float], cfg) -> dict[str, dict[str, float]]:
    s = cfg.stage1
    n = len(walls)
    cuts = {"res/4 latent": (0, int(min(0.3, s.sds_image_start) * n)),
            "res/2 image": (int(0.3 * n), int(0.6 * n)),
            "res image": (int(0.6 * n), n)}
    out = {}
    for name, (a, b) in cuts.items():
        xs = walls[a:b]
        if xs:
            out[name] = {"steps": len(xs), "median_ms": statistics.median(xs),
                         "mean_ms": statistics.fmean(xs), "sum_s": sum(xs) / 1000}
    return out


def _union(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, -1e30
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def analyse_trace(path: Path, steps: int) -> dict:
    """GPU busy time and host sync waits over the profiled steps, from the chrome trace (µs)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        events = json.load(f)["traceEvents"]
    prof_steps = [e for e in events if str(e.get("name", "")).startswith("ProfilerStep#")
                  and e.get("ph") == "X"]
    if not prof_steps:
        return {"error": "no ProfilerStep ranges in the trace"}
    t0 = min(e["ts"] for e in prof_steps)
    t1 = max(e["ts"] + e["dur"] for e in prof_steps)
    gpu = [(e["ts"], e["ts"] + e["dur"]) for e in events if e.get("ph") == "X"
           and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and t0 <= e["ts"] < t1]
    waits: dict[str, float] = {}
    counts: dict[str, int] = {}
    for e in events:
        name = str(e.get("name", ""))
        if e.get("ph") == "X" and e.get("cat") == "cuda_runtime" and t0 <= e["ts"] < t1 and (
                "Synchronize" in name or "Memcpy" in name or "EventSynchronize" in name):
            waits[name] = waits.get(name, 0.0) + e["dur"]
            counts[name] = counts.get(name, 0) + 1
    launches = sum(1 for e in events if e.get("ph") == "X" and e.get("cat") == "cuda_runtime"
                   and "Launch" in str(e.get("name", "")) and t0 <= e["ts"] < t1)
    graph_launches = sum(1 for e in events if e.get("ph") == "X" and e.get("cat") == "cuda_runtime"
                         and "GraphLaunch" in str(e.get("name", "")) and t0 <= e["ts"] < t1)
    wall = t1 - t0
    busy = _union(gpu)
    return {"steps": steps, "wall_ms_per_step": wall / 1e3 / steps,
            "gpu_busy_ms_per_step": busy / 1e3 / steps, "gpu_busy_share": busy / wall,
            "host_waits_ms_per_step": {k: v / 1e3 / steps for k, v in sorted(waits.items())},
            "host_wait_calls_per_step": {k: c / steps for k, c in sorted(counts.items())},
            "kernel_launches_per_step": launches / steps,
            "graph_launches_per_step": graph_launches / steps}


def profile_windows(model, cfg, device, windows: list[tuple[int, int]], trace: Path) -> list[dict]:
    """One stage-1 run, the profiler recording each (start, stop) window of steps."""
    from torch.profiler import ProfilerAction, ProfilerActivity, profile

    def action(step: int) -> ProfilerAction:
        for a, b in windows:
            if a - 2 <= step < a:
                return ProfilerAction.WARMUP
            if a <= step < b - 1:
                return ProfilerAction.RECORD
            if step == b - 1:
                return ProfilerAction.RECORD_AND_SAVE
        return ProfilerAction.NONE

    results: list[dict] = []

    def ready(prof) -> None:
        a, b = windows[len(results)]
        path = trace.with_name(trace.name.replace(".json", f"_{len(results)}.json"))
        results.append(summarise(prof, b - a, path) | {"window": [a, b]})

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, schedule=action, on_trace_ready=ready) as prof:
        run_stage1(model, cfg, device, lambda p: prof.step())
    return results


def summarise(prof, n: int, trace: Path) -> dict:
    avg = prof.key_averages()

    def dev(e):
        return getattr(e, "device_time_total", 0.0)

    def self_dev(e):
        return getattr(e, "self_device_time_total", 0.0)

    labels = {e.key: {"cpu_ms_per_step": e.cpu_time_total / 1e3 / n,
                      "gpu_ms_per_step": dev(e) / 1e3 / n, "calls_per_step": e.count / n}
              for e in avg if e.key in LABELS}
    top_gpu = [{"name": e.key[:110], "gpu_ms_per_step": self_dev(e) / 1e3 / n, "calls_per_step": e.count / n}
               for e in sorted(avg, key=lambda e: -self_dev(e))[:30]]
    top_cpu = [{"name": e.key[:110], "self_cpu_ms_per_step": e.self_cpu_time_total / 1e3 / n,
                "calls_per_step": e.count / n}
               for e in sorted(avg, key=lambda e: -e.self_cpu_time_total)[:30]]
    raw = trace.with_suffix("") if trace.suffix == ".gz" else trace
    prof.export_chrome_trace(str(raw))
    if trace.suffix == ".gz":
        with open(raw, "rb") as f, gzip.open(trace, "wb") as g:
            g.write(f.read())
        raw.unlink()
    return {"labels": labels, "top_gpu": top_gpu, "top_cpu": top_cpu, "trace": analyse_trace(trace, n)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--preset", default="standard")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--window", action="append", default=[],
                    help="START:STOP steps to profile (repeatable; default: 100:115 and 420:440 of "
                         "500, scaled to the preset's steps)")
    ap.add_argument("--tiny", action="store_true", help="the tests' tiny random model (a CPU check of this script)")
    ap.add_argument("--vae-graphs", action="store_true", help="model.vae_graphs=true")
    ap.add_argument("--json-out", type=Path, default=None)
    ap.add_argument("--trace", type=Path, default=Path("stage1_trace.json.gz"),
                    help="chrome trace of the last window (one file per window: _N appended)")
    args = ap.parse_args(argv)

    from tdgen.config import resolve_config
    from tdgen.testing.full_model import build_full_sd21_base

    device = torch.device(args.device)
    install_labels()
    if args.tiny:
        import tempfile

        from tdgen.config import ModelConfig
        from tdgen.guidance import load_model
        from tdgen.testing.tiny_model import write_tiny_model

        model = load_model(ModelConfig(id=str(write_tiny_model(Path(tempfile.mkdtemp()) / "m"))), device)
    else:
        model = build_full_sd21_base(device, torch.float16, vae_graphs=args.vae_graphs)
    sets = dict(s.partition("=")[::2] for s in args.set) | {"model.id": model.model_id}
    cfg = resolve_config(args.preset, sets)
    steps = cfg.stage1.steps
    windows = args.window or [f"{steps // 5}:{steps // 5 + 15}", f"{int(steps * .84)}:{int(steps * .84) + 20}"]

    _, warm_s = run_stage1(model, cfg, device)
    print(f"[profile] warm-up stage 1: {warm_s:.1f} s", file=sys.stderr)
    t0 = time.perf_counter()
    walls = step_walls(model, cfg, device)
    stage1_s = time.perf_counter() - t0
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "preset": args.preset, "sets": args.set,
              "torch": torch.__version__, "stage1_s": stage1_s, "warmup_stage1_s": warm_s,
              "steps": steps, "phases": phases(walls, cfg), "step_ms": [round(w, 2) for w in walls],
              "windows": []}
    spans = sorted(tuple(int(x) for x in w.split(":")) for w in windows)
    report["windows"] = profile_windows(model, cfg, device, spans, args.trace)
    for w in report["windows"]:
        print(f"[profile] window {w['window']}: {json.dumps(w['trace'])}", file=sys.stderr)
    text = json.dumps(report, indent=1)
    if args.json_out:
        args.json_out.write_text(text)
    print(json.dumps({k: v for k, v in report.items() if k != "step_ms"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
