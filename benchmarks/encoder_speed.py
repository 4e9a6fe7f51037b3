"""SD's VAE encoder forward + backward to its input, the largest part of an SDS step: eager
against a CUDA graph and torch.compile, with the compile's cold and cached cost.

An SDS step needs ∂latents/∂image only (the VAE's weights are frozen), at batch 1, 512², fp16.
Each variant is checked against eager on the same input and output gradient.

    python benchmarks/encoder_speed.py --device cuda --json-out enc.json
    python benchmarks/encoder_speed.py --device cuda --variants compile   # a second process: cached
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import environment, log, synchronize, to_json, write_json  # noqa: E402

VARIANTS = ("eager", "graph", "compile", "compile-max-autotune", "eager-math-attn", "compile-math-attn")
"""`-math-attn`: the mid-block attention (one head of 512 channels over 64² tokens) on PyTorch's
math SDPA backend; flash and cuDNN do not take a head of 512, so eager picks memory-efficient,
whose backward is slow at one head."""


def _encoder(device: torch.device, dtype: torch.dtype):
    from diffusers import AutoencoderKL

    from tdgen.testing.full_model import SD21_VAE

    torch.manual_seed(0)
    with torch.device(device):
        vae = AutoencoderKL(**SD21_VAE).to(dtype).eval().requires_grad_(False)

    def moments(x: torch.Tensor) -> torch.Tensor:  # [B, 3, H, W] → [B, 8, H/8, W/8]
        return vae.quant_conv(vae.encoder(x))

    return moments


def _math_attention(fn):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run(x):
        with sdpa_kernel([SDPBackend.MATH]):
            return fn(x)

    return run


def _time(fn, x, g, steps: int, device) -> float:
    def once():
        x.grad = None
        fn(x).backward(g)

    for _ in range(3):
        once()
    synchronize(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        once()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    moments = _encoder(device, dtype)
    gen = torch.Generator(device=device).manual_seed(1)
    shape = (args.batch, 3, args.resolution, args.resolution)
    x = (torch.rand(shape, generator=gen, device=device) * 2 - 1).to(dtype).requires_grad_(True)
    r = args.resolution // 8
    g = torch.randn((args.batch, 8, r, r), generator=gen, device=device).to(dtype)
    x.grad = None
    moments(x).backward(g)
    ref = x.grad.detach().float().clone()

    rows: list[dict[str, Any]] = []
    for name in [v.strip() for v in args.variants.split(",") if v.strip()]:
        torch.compiler.reset()
        t0 = time.perf_counter()
        if name == "eager":
            fn = moments
        elif name == "graph":
            fn = torch.cuda.make_graphed_callables(moments, (x,))
        elif name in ("compile", "compile-math-attn"):
            fn = torch.compile(moments)
        elif name == "eager-math-attn":
            fn = moments
        elif name == "compile-max-autotune":
            fn = torch.compile(moments, mode="max-autotune-no-cudagraphs")
        else:
            raise SystemExit(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
        if name.endswith("-math-attn"):
            fn = _math_attention(fn)
        x.grad = None
        fn(x).backward(g)  # compiles / captures here
        synchronize(device)
        setup_s = time.perf_counter() - t0
        err = float((x.grad.float() - ref).abs().max() / ref.abs().max())
        ms = _time(fn, x, g, args.steps, device)
        rows.append({"variant": name, "ms_fwd_bwd": ms, "setup_s": setup_s, "grad_rel_err": err})
        log(f"[encoder] {name}: {ms:.2f} ms fwd+bwd, setup {setup_s:.1f} s, rel err {err:.2e}")
    report = {"benchmark": "encoder_speed", "environment": environment(device),
              "resolution": args.resolution, "batch": args.batch, "dtype": str(dtype), "rows": rows}
    print(to_json(report))
    if args.json_out:
        write_json(args.json_out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
