"""Full-size Stable Diffusion 2.1-base architecture with random weights, built in memory.

Same layer shapes as the real checkpoint, hence the same FLOPs and memory: speed benchmarks and
GPU tests run on it without downloading 5 GB of weights. Configs follow the public diffusers
configs of `stabilityai/stable-diffusion-2-1-base` (unet/, text_encoder/, vae/).

    python -m tdgen.testing.full_model --count        # parameter counts (no weights allocated)
    python -m tdgen.testing.full_model --bench 100    # SDS steps/s on CUDA
"""

from __future__ import annotations

import argparse
import json
import time
from types import SimpleNamespace

import torch

from tdgen.guidance import DiffusionModel, assemble_model
from tdgen.testing.tiny_model import SD_SCHEDULER_CONFIG, load_byte_tokenizer

SD21_BASE_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                      "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                    "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=1024,
    attention_head_dim=(5, 10, 20, 20),
    use_linear_projection=True,
)

# OpenCLIP ViT-H/14's text tower in CLIPTextModel form; SD 2.x drops its last of 24 layers.
SD21_TEXT_ENCODER = dict(
    vocab_size=49408,
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=23,
    num_attention_heads=16,
    max_position_embeddings=77,
    hidden_act="gelu",
    layer_norm_eps=1e-5,
    projection_dim=512,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)

SD21_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=768,
    scaling_factor=0.18215,
)


def _build_modules(device):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    # Built directly on `device`: initialising 1.3B parameters on the CPU first takes minutes.
    with torch.device(device):
        unet = UNet2DConditionModel(**SD21_BASE_UNET)
        text_encoder = CLIPTextModel(CLIPTextConfig(**SD21_TEXT_ENCODER))
        vae = AutoencoderKL(**SD21_VAE)
    return text_encoder, vae, unet


def build_tiny_autoencoder(device, dtype: torch.dtype):
    """A random AutoencoderTiny with diffusers' defaults (the TAESD architecture), frozen."""
    from diffusers import AutoencoderTiny

    with torch.device(device):
        ae = AutoencoderTiny()
    return torch.nn.Module.to(ae, dtype=dtype).eval().requires_grad_(False)


def build_full_sd21_base(device, dtype: torch.dtype, tiny_encoder: bool = False,
                         cuda_graphs: bool = True, seed: int = 0,
                         compile_encoder: bool = True, compile_decoder: bool = True,
                         compile_unet: bool = False, vae_graphs: bool = False) -> DiffusionModel:
    """The full SD 2.1-base architecture with random weights, as a DiffusionModel on `device`."""
    from diffusers import DDIMScheduler

    device = torch.device(device)
    cuda_index = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_index):
        torch.manual_seed(seed)
        text_encoder, vae, unet = _build_modules(device)
        tiny_vae = build_tiny_autoencoder(device, dtype) if tiny_encoder else None
    for m in (text_encoder, vae, unet):
        # The plain nn.Module cast: diffusers' override warns about fp32-only submodules, and
        # SD's UNet and VAE have none.
        torch.nn.Module.to(m, dtype=dtype)
    scheduler = DDIMScheduler(**{k: v for k, v in SD_SCHEDULER_CONFIG.items()
                                 if k != "skip_prk_steps"})
    return assemble_model(load_byte_tokenizer(), text_encoder, vae, unet, scheduler, device, dtype,
                          "random:sd21-base", {"id": "random:sd21-base"}, tiny_vae=tiny_vae,
                          cuda_graphs=cuda_graphs, compile_encoder=compile_encoder,
                          compile_decoder=compile_decoder, compile_unet=compile_unet,
                          vae_graphs=vae_graphs)


def parameter_counts() -> dict[str, int]:
    """Parameters per component, from modules built on the meta device (no memory used)."""
    text_encoder, vae, unet = _build_modules("meta")
    from diffusers import AutoencoderTiny

    with torch.device("meta"):
        tiny = AutoencoderTiny()
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {"unet": count(unet), "text_encoder": count(text_encoder), "vae": count(vae),
            "tiny_autoencoder": count(tiny)}


def bench_sds(steps: int, tiny_encoder: bool, cuda_graphs: bool, resolution: int = 512) -> dict:
    """Seconds per SDS step (render-free: a random image with grad) on CUDA, full-size model."""
    from tdgen.config import Stage1Config
    from tdgen.guidance import SDSGuidance
    from tdgen.runtime import make_generator

    device = torch.device("cuda")
    model = build_full_sd21_base(device, torch.float16, tiny_encoder, cuda_graphs)
    cfg = Stage1Config(steps=steps, encode_resolution=resolution)
    sds = SDSGuidance(model, "a wooden chair", cfg, make_generator(0, device))
    img = torch.rand(1, 3, resolution, resolution, device=device, requires_grad=True)
    cams = SimpleNamespace(azimuth=torch.zeros(1), elevation=torch.zeros(1))
    bg = torch.ones(1, 3, device=device)
    for i in range(5):  # warm-up (graph capture, cuDNN autotune)
        sds.loss(img, cams, bg, i / steps).backward()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(steps):
        sds.loss(img, cams, bg, i / steps).backward()
    torch.cuda.synchronize()
    sec = time.perf_counter() - t0
    return {"steps": steps, "seconds": round(sec, 3), "ms_per_step": round(1000 * sec / steps, 2),
            "seconds_per_500": round(500 * sec / steps, 2), "tiny_encoder": tiny_encoder,
            "cuda_graphs": cuda_graphs, "encode_resolution": resolution,
            "gpu": torch.cuda.get_device_name()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tdgen.testing.full_model",
                                     description="Full-size random SD 2.1-base: counts, timing.")
    parser.add_argument("--count", action="store_true", help="print parameter counts as JSON")
    parser.add_argument("--bench", type=int, default=0, metavar="STEPS",
                        help="time this many SDS steps on CUDA and print JSON")
    parser.add_argument("--tiny-encoder", action="store_true", help="SDS through AutoencoderTiny")
    parser.add_argument("--no-graphs", action="store_true", help="eager UNet (no CUDA graphs)")
    parser.add_argument("--resolution", type=int, default=512, help="SDS encode resolution")
    args = parser.parse_args(argv)
    if args.count:
        print(json.dumps(parameter_counts()))
    if args.bench:
        print(json.dumps(bench_sds(args.bench, args.tiny_encoder, not args.no_graphs,
                                   args.resolution)))
    if not (args.count or args.bench):
        parser.print_help()


if __name__ == "__main__":
    main()
