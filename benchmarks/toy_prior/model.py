"""The toy prior's components in diffusers layout: word-level CLIP tokenizer, a text tower built
to keep words apart, AutoencoderKL (factor 8), UNet2DConditionModel, SD's scheduler config.

Why the text side is built and not learnt: two earlier attempts (a random 2-layer CLIP tower over
the byte-level tokenizer, frozen and then trained jointly) gave a UNet whose loss with the prompt
equalled its loss with the empty prompt — prompts differing in a few byte positions produced
nearly identical embeddings. Here every caption word is one token (BPE merges written for it), its
embedding a random N(0, I) vector (nearly orthogonal to the others in 64-d), and the one
transformer layer's output projections are zero, so the tower returns LayerNorm(token + small
position) per position: object and view words stay well separated.

Two options test whether the prompt's dilution is what keeps a short run from learning it where a
sample's identity is set (high t); both are off, so `train` reproduces the committed prior.
`PriorSize.max_length` shortens the context (the tokenizer's `model_max_length`, which tdgen's
`encode_texts` pads to): at SD's 77, 70 positions are identical end-of-text pads, so a fresh
cross-attention reads the object word at ~1/77 of its weight. `mix_prefix` makes the layer's
attention average each position's prefix into it (zero queries and keys, identity values; CLIP's
mask is causal), so the end-of-text positions carry the whole caption as in a trained CLIP.
Measured on the H200 (benchmarks/results/toy-prior-2026-12-02): with both on, 3.0k steps, the
ε-MSE gap between an empty and the right caption at t 750–1000 was +0.0025, as without them
(+0.0026 at 5.1k steps), and DDIM samples still ignored the prompt.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tdgen.testing.tiny_model import (BOS_TOKEN, EOS_TOKEN, MAX_LENGTH, SD_SCHEDULER_CONFIG,
                                      byte_level_vocab, write_tokenizer_files)


@dataclass(frozen=True)
class PriorSize:
    """Everything about the prior that scales with the device it is trained on."""

    image: int
    """Training image size, pixels (latents are image / 8)."""
    vae_channels: tuple[int, ...]
    unet_channels: tuple[int, ...]
    unet_layers: int
    text_dim: int = 64
    """Width of the text tower = the UNet's cross-attention dim."""
    heads: int = 4
    global_text: bool = True
    """Also feed an attention-pooled prompt into the time embedding (diffusers'
    `addition_embed_type="text"`), a FiLM path to every ResNet block beside cross-attention."""
    max_length: int = MAX_LENGTH
    """Text context length (tokenizer `model_max_length`); "a <name>, <view> view" is 7 tokens."""
    mix_prefix: bool = False
    """The tower's attention averages each position's prefix into it (see the module docstring)."""


SIZES: dict[str, PriorSize] = {
    # CPU: 64 px images, 8×8 latents, a few MB of weights, trains in minutes on 2 cores.
    "cpu": PriorSize(image=64, vae_channels=(16, 32, 32, 32), unet_channels=(64, 128),
                     unet_layers=1),
    # GPU: 128 px images, 16×16 latents.
    # GPU: 128 px images, 16×16 latents; 12M parameters, so the fp16 folder (~24 MB) can
    # still be copied around.
    "gpu": PriorSize(image=128, vae_channels=(32, 64, 64, 64), unet_channels=(64, 128, 128),
                     unet_layers=2, text_dim=128, heads=8),
}

WORDS = ("a", ",", "view", "front", "side", "back")
"""Caption words besides the object names (`PROMPTS` gives "a <name>")."""


def word_vocab(words: list[str]) -> tuple[dict[str, int], list[str]]:
    """CLIP's byte-level vocabulary plus one token per word (`word</w>`) and the BPE merges that
    build it left to right, so any text still tokenizes and every listed word is a single id."""
    vocab = byte_level_vocab()
    merges: list[str] = []
    for w in words:
        syms = list(w[:-1]) + [w[-1] + "</w>"]
        cur = syms[0]
        for s in syms[1:]:
            merges.append(f"{cur} {s}")
            cur += s
            vocab.setdefault(cur, len(vocab))
    return vocab, list(dict.fromkeys(merges))


def write_word_tokenizer(folder: Path, words: list[str], max_length: int = MAX_LENGTH) -> Path:
    write_tokenizer_files(folder)  # the configs and special tokens of tdgen's test tokenizer
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model_max_length"] = max_length
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    vocab, merges = word_vocab(words)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder


def build_text_encoder(vocab_size: int, bos: int, eos: int, size: PriorSize, seed: int):
    """CLIPTextModel whose output at position i is LayerNorm(x_i [+ mean_{j≤i} LN(x_j)]),
    x = token_emb + 0.05·pos_emb; the bracket with `size.mix_prefix`."""
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(vocab_size=vocab_size, max_position_embeddings=size.max_length,
                         bos_token_id=bos, eos_token_id=eos, pad_token_id=eos,
                         hidden_size=size.text_dim, intermediate_size=2 * size.text_dim,
                         num_hidden_layers=1, num_attention_heads=size.heads,
                         projection_dim=size.text_dim, hidden_act="gelu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        te = CLIPTextModel(cfg)
        # transformers 5 flattened CLIPTextModel (no .text_model); 4.x nests it.
        tower = getattr(te, "text_model", te)
        emb = tower.embeddings
        with torch.no_grad():
            emb.token_embedding.weight.normal_(0.0, 1.0)
            emb.position_embedding.weight.normal_(0.0, 0.05)
            layer = tower.encoder.layers[0]
            att = layer.self_attn
            mixed = (att.q_proj, att.k_proj) if size.mix_prefix else (att.out_proj,)
            for lin in (*mixed, layer.mlp.fc2):
                lin.weight.zero_()
                lin.bias.zero_()
            if size.mix_prefix:  # uniform causal attention, identity values: prefix means
                for lin in (att.v_proj, att.out_proj):
                    lin.weight.copy_(torch.eye(size.text_dim))
                    lin.bias.zero_()
    return te


def vae_config(size: PriorSize) -> dict:
    ch = size.vae_channels
    return dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(ch),
                up_block_types=("UpDecoderBlock2D",) * len(ch), block_out_channels=ch,
                layers_per_block=1, latent_channels=4, norm_num_groups=8,
                sample_size=size.image, scaling_factor=1.0)


def unet_config(size: PriorSize) -> dict:
    ch = size.unet_channels
    n = len(ch)
    cfg = dict(sample_size=size.image // 8, in_channels=4, out_channels=4,
               down_block_types=("CrossAttnDownBlock2D",) * n,
               up_block_types=("CrossAttnUpBlock2D",) * n, block_out_channels=ch,
               layers_per_block=size.unet_layers, attention_head_dim=size.heads,
               cross_attention_dim=size.text_dim, norm_num_groups=32, use_linear_projection=True)
    if size.global_text:
        cfg.update(addition_embed_type="text", addition_embed_type_num_heads=size.heads)
    return cfg


@dataclass
class Components:
    tokenizer: object
    text_encoder: object
    vae: object
    unet: object
    size: PriorSize
    extra: dict = field(default_factory=dict)


def build_components(size: PriorSize, words: list[str], seed: int, folder: Path) -> Components:
    """Fresh components; the tokenizer is written to `folder/tokenizer` (it is files anyway)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(write_word_tokenizer(folder / "tokenizer", words,
                                                                 size.max_length)))
    vocab = tok.get_vocab()
    te = build_text_encoder(len(vocab), vocab[BOS_TOKEN], vocab[EOS_TOKEN], size, seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**vae_config(size))
        unet = UNet2DConditionModel(**unet_config(size))
    return Components(tok, te, vae, unet, size)


def save_model(c: Components, folder: Path, info: dict) -> Path:
    """Write the diffusers folder tdgen loads with `--model folder` (safetensors only)."""
    import diffusers
    from diffusers import PNDMScheduler

    from tdgen.guidance import quiet_hf_progress

    folder.mkdir(parents=True, exist_ok=True)
    with quiet_hf_progress():
        c.text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
        c.vae.save_pretrained(folder / "vae", safe_serialization=True)
        c.unet.save_pretrained(folder / "unet", safe_serialization=True)
    PNDMScheduler(**SD_SCHEDULER_CONFIG).save_pretrained(folder / "scheduler")
    index = {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None], "requires_safety_checker": False,
        "safety_checker": [None, None], "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    (folder / "toy_prior.json").write_text(json.dumps(info, indent=2) + "\n")
    (folder / "tdgen.toml").write_text(MODEL_SETTINGS)
    return folder


MODEL_SETTINGS = """\
# The settings tdgen uses this model at (tdgen.config.MODEL_SETTINGS_FILE): over the code
# defaults, under any preset, --config or --set.
[stage1]
# This prior's SDS guidance. At SD's 100 its conditional-minus-unconditional direction, scaled
# a hundredfold, fattens the shapes (mean silhouette IoU .811, chair .61-.74); at 20 the same
# defaults reach .859, every object >= .77, 4 objects x 3 seeds on the CPU
# (benchmarks/results/toy-prior-2026-12-07b/). SD keeps 100.
guidance_scale = 20.0
"""
