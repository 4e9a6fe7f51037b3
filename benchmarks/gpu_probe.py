"""Quick GPU environment probe: versions, gsplat kernel build, SD-2.1-base-sized UNet/VAE timings.

Run on the GPU machine: `python benchmarks/gpu_probe.py [--vae | --unet | --vae-compile]` (prints
JSON). Random weights only. Results on an H200 (2026-11-22) that set tdgen's defaults:
  --vae          VAE encoder fwd+bwd at 512², fp16: NCHW 23.6 ms, channels_last 30.6 ms → NCHW
  --unet         UNet CFG forward, CUDA graph: NCHW 11.4 ms, channels_last 9.8 ms → channels_last
  --vae-compile  torch.compile of the encoder: 24.2 → 17.0 ms, but 27 s to compile in each new
                 process (max-autotune: 19.4 ms after 322 s) → left off
"""

from __future__ import annotations

import json
import time

import torch


def timed(fn, n=20, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(n):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(e))
    ts.sort()
    return ts[len(ts) // 2]


def _sd21_unet():
    """SD 2.1-base's UNet (random weights), the config tdgen.testing.full_model uses."""
    from diffusers import UNet2DConditionModel

    from tdgen.testing.full_model import SD21_BASE_UNET

    return UNet2DConditionModel(**SD21_BASE_UNET)


def _sd_vae():
    """SD's AutoencoderKL (random weights)."""
    from diffusers import AutoencoderKL

    from tdgen.testing.full_model import SD21_VAE

    return AutoencoderKL(**SD21_VAE)


def main():
    import diffusers
    import gsplat
    import transformers
    out = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "gsplat": gsplat.__version__,
    }
    dev = torch.device("cuda")
    t0 = time.perf_counter()
    means = torch.randn(1000, 3, device=dev)
    quats = torch.randn(1000, 4, device=dev)
    scales = torch.rand(1000, 3, device=dev) * 0.1
    opac = torch.rand(1000, device=dev)
    colors = torch.rand(1000, 3, device=dev)
    viewmats = torch.eye(4, device=dev)[None].clone()
    viewmats[0, 2, 3] = 5
    Ks = torch.tensor([[[300.0, 0, 128], [0, 300.0, 128], [0, 0, 1]]], device=dev)
    gsplat.rasterization(means, quats, scales, opac, colors, viewmats, Ks, 256, 256)
    torch.cuda.synchronize()
    out["gsplat_first_call_s"] = round(time.perf_counter() - t0, 1)

    unet = _sd21_unet().to(dev, torch.float16).eval()
    vae = _sd_vae().to(dev, torch.float16).eval()
    out["unet_params_M"] = round(sum(p.numel() for p in unet.parameters()) / 1e6, 1)
    lat = torch.randn(2, 4, 64, 64, device=dev, dtype=torch.float16)
    emb = torch.randn(2, 77, 1024, device=dev, dtype=torch.float16)
    t = torch.tensor([500, 500], device=dev)
    with torch.no_grad():
        out["unet_cfg_eager_ms"] = round(timed(lambda: unet(lat, t, encoder_hidden_states=emb).sample), 2)
    img = torch.rand(1, 3, 512, 512, device=dev, dtype=torch.float16, requires_grad=True)

    def enc():
        z = vae.encode(img).latent_dist.mean
        z.float().sum().backward()

    out["vae_enc_fwd_bwd_512_ms"] = round(timed(enc), 2)
    out["peak_mem_GB"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    print(json.dumps(out))


def vae_variants():
    """VAE encoder forward+backward at 512², the larger half of an SDS step: which settings help."""
    dev = torch.device("cuda")
    rows = []
    for dtype in (torch.float16, torch.bfloat16):
        for cl in (False, True):
            for bench in (False, True):
                torch.backends.cudnn.benchmark = bench
                vae = _sd_vae().to(dev, dtype).eval().requires_grad_(False)
                if cl:
                    vae.to(memory_format=torch.channels_last)
                img = torch.rand(1, 3, 512, 512, device=dev, dtype=dtype)
                if cl:
                    img = img.contiguous(memory_format=torch.channels_last)
                img.requires_grad_(True)

                def enc():
                    z = vae.encode(img).latent_dist.mean
                    z.float().sum().backward()

                def fwd():
                    with torch.no_grad():
                        vae.encode(img).latent_dist.mean

                rows.append({"dtype": str(dtype).split(".")[-1], "channels_last": cl, "cudnn_benchmark": bench,
                             "fwd_ms": round(timed(fwd), 2), "fwd_bwd_ms": round(timed(enc), 2)})
                print(json.dumps(rows[-1]), flush=True)
    torch.backends.cudnn.benchmark = False
    return rows


def unet_variants():
    """The UNet's CFG forward (batch 2, 64² latents): NCHW vs channels_last, eager vs CUDA graph."""
    dev = torch.device("cuda")
    unet = _sd21_unet().to(dev, torch.float16).eval().requires_grad_(False)
    emb = torch.randn(2, 77, 1024, device=dev, dtype=torch.float16)
    t = torch.tensor([500, 500], device=dev)
    rows = []
    for cl in (False, True):
        unet.to(memory_format=torch.channels_last if cl else torch.contiguous_format)
        lat = torch.randn(2, 4, 64, 64, device=dev, dtype=torch.float16)
        if cl:
            lat = lat.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            eager = timed(lambda: unet(lat, t, encoder_hidden_states=emb).sample)
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(3):
                    unet(lat, t, encoder_hidden_states=emb)
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                unet(lat, t, encoder_hidden_states=emb)
            graph = timed(g.replay)
        rows.append({"channels_last": cl, "eager_ms": round(eager, 2), "graph_ms": round(graph, 2)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def vae_compiled():
    """The VAE encoder's forward+backward at 512² eager vs torch.compile (and the compile time)."""
    dev = torch.device("cuda")
    vae = _sd_vae().to(dev, torch.float16).eval().requires_grad_(False)
    img = torch.rand(1, 3, 512, 512, device=dev, dtype=torch.float16, requires_grad=True)

    def step(encode):
        z = encode(img)
        z.float().sum().backward()

    def eager(x):
        return vae.encode(x).latent_dist.mean

    rows = {"eager_fwd_bwd_ms": round(timed(lambda: step(eager)), 2)}
    for mode in ("default", "max-autotune-no-cudagraphs"):
        torch._dynamo.reset()
        compiled = torch.compile(eager, mode=mode, fullgraph=False)
        t0 = time.perf_counter()
        step(compiled)
        torch.cuda.synchronize()
        rows[f"{mode}_compile_s"] = round(time.perf_counter() - t0, 1)
        rows[f"{mode}_fwd_bwd_ms"] = round(timed(lambda: step(compiled)), 2)
        print(json.dumps(rows), flush=True)
    return rows


if __name__ == "__main__":
    import sys

    # One probe per call: each is a separate question and the lease is short.
    if "--vae-compile" in sys.argv:
        vae_compiled()
    elif "--unet" in sys.argv:
        unet_variants()
    elif "--vae" in sys.argv:
        vae_variants()
    else:
        main()
