"""Where a cold `tdgen make` spends its model load: CUDA start-up, then each component read from a
local diffusers folder, by two routes, each in a fresh process (the page cache is warm after a
priming read, as it is for a user's second run).

- `host`: what `tdgen.model.load_model` does — read to host memory, then `.to()`.
- `direct`: the weights go from the safetensors files straight to the device (`device_map`).
- `tdgen`: `tdgen.model.load_model` as it is now.

    python benchmarks/load_speed.py --device cuda --write /tmp/sd21 --json-out load.json
    python benchmarks/load_speed.py --device cuda --model /tmp/sd21 --routes tdgen
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROUTES = ("host", "direct", "tdgen")

_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel
t_import = time.perf_counter() - t0
folder, route, device = sys.argv[1], sys.argv[2], torch.device(sys.argv[3])
out = {"import_s": t_import}
t = time.perf_counter()
if device.type == "cuda":
    torch.zeros(1, device=device)
    torch.cuda.synchronize(device)
out["device_init_s"] = time.perf_counter() - t
dtype = torch.float16 if device.type == "cuda" else torch.float32
if route == "tdgen":
    from tdgen.config import ModelConfig
    from tdgen.model import load_model
    t = time.perf_counter()
    load_model(ModelConfig(id=folder, dtype="auto", cuda_graphs=False, compile_encoder=False), device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    out["total_s"] = time.perf_counter() - t
else:
    kw = {"use_safetensors": True}
    if route == "direct":
        kw["device_map"] = {"": device}
    total = 0.0
    for name, cls, dkey in (("text_encoder", CLIPTextModel, "dtype"),
                            ("vae", AutoencoderKL, "torch_dtype"),
                            ("unet", UNet2DConditionModel, "torch_dtype")):
        t = time.perf_counter()
        m = cls.from_pretrained(f"{folder}/{name}", **{dkey: dtype}, **kw)
        read = time.perf_counter() - t
        m.to(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        sec = time.perf_counter() - t
        out[f"{name}_s"] = sec
        out[f"{name}_read_s"] = read
        out[f"{name}_on"] = str(next(m.parameters()).device)
        total += sec
    out["total_s"] = total
print("JSON " + json.dumps(out))
"""


def run_route(folder: Path, route: str, device: str) -> dict[str, Any]:
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(folder), route, device],
                          capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"route {route} failed: {proc.stderr[-2000:]}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("JSON "))
    return {"route": route, "process_s": wall, **json.loads(line[5:])}


def main() -> None:
    import torch

    from benchmarks.common import environment, log, write_json

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", type=Path, help="a diffusers folder of safetensors")
    src.add_argument("--write", type=Path, help="write the full-size random-weight model here first")
    ap.add_argument("--routes", default=",".join(ROUTES))
    ap.add_argument("--runs", type=int, default=2, help="fresh processes per route")
    ap.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args()

    folder = args.model
    if args.write is not None:
        from benchmarks.batch_speed import write_full_model

        folder = write_full_model(args.write, torch.float16)
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    size = sum(p.stat().st_size for p in folder.rglob("*.safetensors"))
    run_route(folder, "host", args.device)  # priming: the page cache holds the files afterwards
    rows = []
    for route in args.routes.split(","):
        for i in range(args.runs):
            r = run_route(folder, route, args.device)
            rows.append(r)
            log(f"[load] {route} {i}: {r['total_s']:.2f} s load, {r['device_init_s']:.2f} s device "
                f"init, {r['process_s']:.2f} s process")
    report = {"benchmark": "load_speed", "environment": environment(args.device),
              "weights_gb": size / 1e9, "rows": rows}
    print(json.dumps(report, indent=1))
    if args.json_out:
        write_json(args.json_out, report)


if __name__ == "__main__":
    main()
