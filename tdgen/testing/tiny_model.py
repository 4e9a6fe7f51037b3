"""A tiny randomly-initialised Stable Diffusion model in diffusers layout, for tests and smoke runs.

Same component classes and folder layout as SD 2.1-base (tokenizer/, text_encoder/, vae/, unet/,
scheduler/, model_index.json, safetensors weights), so it goes through exactly the loading path of
the real model (`tdgen --model DIR`). The VAE keeps SD's downsampling factor 8, so latent shapes
match the real model; every module is a few channels wide (well under 2M parameters in total).

    python -m tdgen.testing.tiny_model DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

SEED = 0
MAX_LENGTH = 77
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"

# SD's DDPM training schedule (every SD 1.x/2.x model card): scaled_linear 0.00085 → 0.012.
SD_SCHEDULER_CONFIG = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
}

TINY_TEXT_CONFIG = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, projection_dim=32, hidden_act="gelu")
TINY_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 16, 16, 16),  # 4 blocks → 3 downsamplings → factor 8, like SD
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=64,
    scaling_factor=0.18215,
)
TINY_UNET_CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64),
    layers_per_block=1,
    attention_head_dim=(2, 4),
    cross_attention_dim=32,
    norm_num_groups=8,
    use_linear_projection=True,  # as SD 2.x
)


def byte_level_vocab() -> dict[str, int]:
    """CLIP-style BPE vocabulary with no merges: the 256 byte symbols, their end-of-word forms and
    the two specials. Any text tokenizes (one token per byte), which is all tests need."""
    from tokenizers.pre_tokenizers import ByteLevel

    symbols = sorted(ByteLevel.alphabet())  # sorted: the library returns a set-ordered list
    tokens = symbols + [s + "</w>" for s in symbols] + [BOS_TOKEN, EOS_TOKEN]
    return {tok: i for i, tok in enumerate(tokens)}


def write_tokenizer_files(folder: str | Path) -> Path:
    """Write a working CLIPTokenizer folder (vocab.json, merges.txt, configs), built locally."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(byte_level_vocab(), ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_LENGTH,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "do_lower_case": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    specials = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    return folder


def load_byte_tokenizer(folder: str | Path | None = None):
    """The locally built byte-level CLIPTokenizer (written to a temp folder when none is given)."""
    import tempfile

    from transformers import CLIPTokenizer

    if folder is None:
        folder = write_tokenizer_files(Path(tempfile.mkdtemp(prefix="tdgen-tok-")))
    return CLIPTokenizer.from_pretrained(str(folder))


def write_tiny_model(path: str | Path, seed: int = SEED) -> Path:
    """Write the tiny random SD model to `path` (created if needed) and return `path`."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from tdgen.guidance import quiet_hf_progress

    import diffusers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_tokenizer_files(path / "tokenizer")
    vocab = byte_level_vocab()

    # Forked RNG: writing a model must not disturb the caller's global random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_config = CLIPTextConfig(
            vocab_size=len(vocab),
            max_position_embeddings=MAX_LENGTH,
            bos_token_id=vocab[BOS_TOKEN],
            eos_token_id=vocab[EOS_TOKEN],
            pad_token_id=vocab[EOS_TOKEN],
            **TINY_TEXT_CONFIG,
        )
        text_encoder = CLIPTextModel(text_config)
        vae = AutoencoderKL(**TINY_VAE_CONFIG)
        unet = UNet2DConditionModel(**TINY_UNET_CONFIG)

    with quiet_hf_progress():
        text_encoder.save_pretrained(path / "text_encoder", safe_serialization=True)
        vae.save_pretrained(path / "vae", safe_serialization=True)
        unet.save_pretrained(path / "unet", safe_serialization=True)
    PNDMScheduler(**SD_SCHEDULER_CONFIG).save_pretrained(path / "scheduler")

    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (path / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tdgen.testing.tiny_model",
        description="Write a tiny random Stable Diffusion model (diffusers layout) for tests.",
    )
    parser.add_argument("dir", type=Path, help="output folder (created if missing)")
    parser.add_argument("--seed", type=int, default=SEED, help="weight initialisation seed")
    args = parser.parse_args(argv)
    print(write_tiny_model(args.dir, seed=args.seed))


if __name__ == "__main__":
    main()
