"""The tiny random SD model: layout, loadability, tokenizer, determinism; full-size configs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tdgen.io import sha256_file


def _weights(folder):
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in folder.rglob("*.safetensors")}


def test_layout_is_diffusers_sd_with_safetensors_only(tiny_model_dir):
    index = json.loads((tiny_model_dir / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    for comp in ("tokenizer", "text_encoder", "vae", "unet", "scheduler"):
        assert (tiny_model_dir / comp).is_dir(), comp
    assert set(_weights(tiny_model_dir)) == {
        "text_encoder/model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "unet/diffusion_pytorch_model.safetensors",
    }
    assert not [p for p in tiny_model_dir.rglob("*") if p.suffix in (".bin", ".ckpt", ".pt")]


def test_components_round_trip_through_from_pretrained(tiny_model_dir):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tiny_model_dir / "tokenizer")
    te = CLIPTextModel.from_pretrained(tiny_model_dir / "text_encoder", use_safetensors=True)
    vae = AutoencoderKL.from_pretrained(tiny_model_dir / "vae", use_safetensors=True)
    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet", use_safetensors=True)
    sched = DDIMScheduler.from_pretrained(tiny_model_dir, subfolder="scheduler")

    n_params = sum(p.numel() for m in (te, vae, unet) for p in m.parameters())
    assert n_params < 2_000_000
    # SD's training schedule survives the PNDM → DDIM config hop.
    assert sched.config.num_train_timesteps == 1000
    assert sched.config.beta_schedule == "scaled_linear"
    assert sched.config.prediction_type == "epsilon"
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    torch.testing.assert_close(sched.alphas_cumprod.double(), torch.cumprod(1 - betas, 0),
                               rtol=1e-5, atol=1e-6)

    with torch.no_grad():
        ids = tok(["a chair"], padding="max_length", max_length=77, return_tensors="pt").input_ids
        emb = te(ids)[0]  # [1, 77, D]
        z = vae.encode(torch.rand(1, 3, 64, 64) * 2 - 1).latent_dist.mean
        eps = unet(z, torch.tensor([500]), encoder_hidden_states=emb).sample
        img = vae.decode(z).sample
    assert emb.shape == (1, 77, unet.config.cross_attention_dim)
    assert z.shape == (1, 4, 8, 8)  # SD's factor-8 VAE
    assert eps.shape == z.shape and img.shape == (1, 3, 64, 64)
    assert torch.isfinite(eps).all() and torch.isfinite(img).all()


def test_tokenizer_is_a_working_clip_bpe(tiny_model_dir):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tiny_model_dir / "tokenizer")
    assert tok.model_max_length == 77
    out = tok(["a red chair", "a blue car", "A RED CHAIR"], padding="max_length", max_length=77,
              truncation=True, return_tensors="pt").input_ids
    assert out.shape == (3, 77)
    assert (out[:, 0] == tok.bos_token_id).all()
    assert not torch.equal(out[0], out[1])
    assert torch.equal(out[0], out[2])  # CLIP lower-cases
    long = tok(["word " * 200], padding="max_length", max_length=77, truncation=True).input_ids
    assert len(long[0]) == 77


def test_main_writes_the_same_model_for_the_same_seed(tiny_model_dir, tmp_path, capsys):
    from tdgen.testing.tiny_model import main

    out = tmp_path / "again"
    main([str(out)])
    assert capsys.readouterr().out.strip() == str(out)
    assert _weights(out) == _weights(tiny_model_dir)


@pytest.mark.slow  # a fresh interpreter imports torch, diffusers and transformers (~10 s)
def test_cli_writes_the_same_model_for_the_same_seed(tiny_model_dir, tmp_path):
    out = tmp_path / "cli_model"
    res = subprocess.run([sys.executable, "-m", "tdgen.testing.tiny_model", str(out)],
                         capture_output=True, text=True, timeout=120, check=True)
    assert res.stdout.strip().splitlines()[-1] == str(out)
    assert _weights(out) == _weights(tiny_model_dir)


def test_seed_changes_the_weights(tiny_model_dir, tmp_path):
    from tdgen.testing.tiny_model import write_tiny_model

    other = write_tiny_model(tmp_path / "seed1", seed=1)
    a, b = _weights(other), _weights(tiny_model_dir)
    assert set(a) == set(b) and all(a[k] != b[k] for k in a)


def test_full_size_configs_match_sd21_base_parameter_counts():
    from tdgen.testing.full_model import parameter_counts

    counts = parameter_counts()  # meta device: no memory, no weights
    # Public SD 2.1-base counts: UNet 865.9M, OpenCLIP-H text tower (23 layers) 340.4M, VAE 83.7M.
    assert counts["unet"] == pytest.approx(865_910_724, rel=1e-3)
    assert counts["text_encoder"] == pytest.approx(340_387_840, rel=1e-3)
    assert counts["vae"] == pytest.approx(83_653_863, rel=1e-3)
    assert 2_000_000 < counts["tiny_autoencoder"] < 3_000_000  # TAESD is ~2.4M


def test_full_size_builder_assembles_a_frozen_model_on_the_meta_device():
    from tdgen.testing.full_model import build_full_sd21_base

    m = build_full_sd21_base("meta", torch.float16, tiny_encoder=True)  # shapes only, no memory
    assert m.dtype == torch.float16 and m.cuda_graphs is False  # graphs only on CUDA
    for module in (m.text_encoder, m.vae, m.unet, m.tiny_vae):
        p = next(module.parameters())
        assert p.dtype == torch.float16 and not p.requires_grad and not module.training
    assert m.unet.config.cross_attention_dim == m.text_encoder.config.hidden_size == 1024
    assert m.vae.config.scaling_factor == 0.18215
    assert m.tokenizer.model_max_length == 77 and m.num_train_timesteps == 1000


@pytest.mark.gpu
def test_full_size_model_runs_an_sds_step_on_cuda():
    from types import SimpleNamespace

    from tdgen.config import Stage1Config
    from tdgen.guidance import SDSGuidance
    from tdgen.runtime import make_generator
    from tdgen.testing.full_model import build_full_sd21_base

    device = torch.device("cuda")
    model = build_full_sd21_base(device, torch.float16, tiny_encoder=True)
    assert sum(p.numel() for p in model.unet.parameters()) == pytest.approx(865_910_724, rel=1e-3)
    sds = SDSGuidance(model, "a chair", Stage1Config(encode_resolution=512),
                      make_generator(0, device))
    img = torch.rand(1, 3, 256, 256, device=device, requires_grad=True)
    cams = SimpleNamespace(azimuth=torch.tensor([30.0]), elevation=torch.zeros(1))
    loss = sds.loss(img, cams, torch.ones(1, 3, device=device), 0.1)
    loss.backward()
    assert torch.isfinite(loss) and img.grad is not None and torch.isfinite(img.grad).all()
    assert sds.nan_count == 0
