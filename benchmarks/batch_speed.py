"""Batch throughput on the GPU: 8 prompts at `draft` through `tdgen batch`, the full-size
SD-2.1-base architecture with random weights saved to disk and loaded the way a real model is.

Reports assets per hour, the model-load time one batch pays once (8 separate `tdgen make` runs pay
it 8 times, plus a process start each), and that a rerun skips everything.

    python benchmarks/batch_speed.py --device cuda [--n 8] [--preset draft] [--json-out FILE]
    python benchmarks/batch_speed.py --device cuda --gpus 0,0   # two worker processes on one GPU

`--gpus 0,0` is the lever to measure next: a warm stage-1 step in the pipeline runs at 29.4 ms
whether the UNet takes 10 or 6.5 ms of GPU time (h100-2026-12-07c-acceptance), so one process
leaves the GPU idle part of each step, and a second process could fill it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

PROMPTS = [
    "a wooden chair", "a red fire hydrant", "a ceramic teapot", "a treasure chest",
    "a potted cactus", "a viking helmet", "a brass lantern", "a toy robot",
]


def write_full_model(path: Path, dtype: torch.dtype) -> Path:
    """The full-size architecture with random weights as a diffusers folder of safetensors."""
    from tdgen.testing.full_model import build_full_sd21_base
    from tdgen.testing.tiny_model import SD_SCHEDULER_CONFIG, write_tokenizer_files
    from diffusers import PNDMScheduler

    m = build_full_sd21_base("cuda" if torch.cuda.is_available() else "cpu", dtype, cuda_graphs=False)
    path.mkdir(parents=True, exist_ok=True)
    m.text_encoder.save_pretrained(path / "text_encoder", safe_serialization=True)
    m.vae.save_pretrained(path / "vae", safe_serialization=True)
    m.unet.save_pretrained(path / "unet", safe_serialization=True)
    PNDMScheduler(**SD_SCHEDULER_CONFIG).save_pretrained(path / "scheduler")
    write_tokenizer_files(path / "tokenizer")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "PNDMScheduler"],
    }
    (path / "model_index.json").write_text(json.dumps(index))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--preset", default="draft")
    ap.add_argument("--set", action="append", default=[], help="extra section.key=value")
    ap.add_argument("--model-dir", type=Path, default=None, help="reuse a written model folder")
    ap.add_argument("--gpus", default="", help="worker processes, one per entry (0,0: two on GPU 0); "
                    "default: the batch in this process")
    ap.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args()

    from tdgen.batch import parse_prompt_list, plan_assets, run_batch
    from tdgen.config import ModelConfig
    from tdgen.guidance import load_model

    work = Path(tempfile.mkdtemp(prefix="tdgen-batch-"))
    t = time.perf_counter()
    model_dir = args.model_dir or write_full_model(work / "model", torch.float16)
    write_s = time.perf_counter() - t
    size_gb = sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file()) / 1e9

    # what one `tdgen make` pays before its first step: a process with torch + CUDA up, then the
    # model from disk (page cache warm, as on a second run; a cold disk adds its read time)
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch, tdgen.pipeline, tdgen.guidance; torch.zeros(1, device='cuda')"], check=True)
    process_s = time.perf_counter() - t
    dev = torch.device(args.device)
    t = time.perf_counter()
    model = load_model(ModelConfig(id=str(model_dir)), dev)
    torch.cuda.synchronize()
    load_s = time.perf_counter() - t
    del model
    torch.cuda.empty_cache()

    prompts = "\n".join(PROMPTS[i % len(PROMPTS)] + (f" #{i}" if i >= len(PROMPTS) else "") for i in range(args.n))
    sets = {"model.id": str(model_dir)}
    for item in args.set:
        k, _, v = item.partition("=")
        sets[k] = v
    assets = plan_assets(parse_prompt_list(prompts, "bench"), preset=args.preset, sets=sets)
    out = work / "out"
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    gpus = [g.strip() for g in args.gpus.split(",") if g.strip()] or None
    summary = run_batch(assets, out, device=args.device, gpus=gpus)
    batch_s = time.perf_counter() - t
    t = time.perf_counter()
    rerun = run_batch(assets, out, device=args.device)
    rerun_s = time.perf_counter() - t

    done = [r for r in summary.results if r.status == "done"]
    report = {
        "device": torch.cuda.get_device_name(0),
        "preset": args.preset,
        "gpus": gpus,
        "assets": args.n,
        "done": len(done),
        "failed": [(r.name, r.reason) for r in summary.results if r.status == "failed"],
        "model_folder_gb": round(size_gb, 2),
        "model_write_s": round(write_s, 1),
        "process_start_s": round(process_s, 2),
        "model_load_s": round(load_s, 2),
        "batch_wall_s": round(batch_s, 1),
        "seconds_per_asset": round(batch_s / max(len(done), 1), 2),
        "assets_per_hour": round(3600 * len(done) / batch_s, 1),
        "saved_vs_separate_makes_s": round((args.n - 1) * (load_s + process_s), 1),
        "rerun_s": round(rerun_s, 2),
        "rerun_skipped": sum(r.status == "skipped" for r in rerun.results),
        # This process's own peak: with --gpus the workers' memory is not in it.
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
    }
    print(json.dumps(report, indent=1))
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
