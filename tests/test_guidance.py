"""Model loading errors, prompt views, the SDS gradient and schedules, img2img targets."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from types import SimpleNamespace

import pytest
import torch

from tdgen.config import ModelConfig, Stage1Config
from tdgen.errors import ModelFormatError, ModelNotFoundError
from tdgen.guidance import (
    SDSGuidance,
    encode_prompt,
    img2img_target,
    load_model,
    predict_noise_cfg,
    sample_timesteps,
    view_embeddings,
    view_index,
    view_name,
)
from tdgen.io import sha256_file


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_model(ModelConfig(id=str(tiny_model_dir)), "cpu")


@pytest.fixture(scope="module")
def emb(model):
    return encode_prompt(model, "a red chair")


def _cams(*azimuths):
    return SimpleNamespace(azimuth=torch.tensor(azimuths, dtype=torch.float32),
                           elevation=torch.zeros(len(azimuths)))


def _sd_alphas_cumprod():
    # SD's scaled_linear betas, written out so the test does not trust the scheduler.
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


# -------------------------------------------------------------------------------------------
# Loading


def test_load_model_from_folder(model, tiny_model_dir):
    assert model.dtype == torch.float32 and model.device.type == "cpu"  # auto → fp32 on CPU
    assert type(model.scheduler).__name__ == "DDIMScheduler"
    assert not model.unet.training and not any(p.requires_grad for p in model.unet.parameters())
    assert model.tiny_vae is None and model.cuda_graphs is False
    files = model.source["files"]
    assert model.source["id"] == str(tiny_model_dir)
    weights = "unet/diffusion_pytorch_model.safetensors"
    assert files[weights] == sha256_file(tiny_model_dir / weights)
    assert "scheduler/scheduler_config.json" in files and "tokenizer/vocab.json" in files


@pytest.fixture()
def offline_hub(monkeypatch, tmp_path):
    """An empty private HF cache in offline mode (huggingface_hub reads both at import)."""
    import huggingface_hub.constants as hc

    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    return cache


def test_folder_hashes_are_cached_per_file_state(tiny_model_dir, monkeypatch):
    import tdgen.model as G

    first = G.folder_fingerprint(tiny_model_dir)  # the model fixture may have filled the cache
    calls = []
    monkeypatch.setattr(G, "sha256_file", lambda p: calls.append(p) or "x")
    assert G.folder_fingerprint(tiny_model_dir) == first and calls == []
    cfg_file = tiny_model_dir / "scheduler" / "scheduler_config.json"
    st = cfg_file.stat()
    os.utime(cfg_file, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # "edited"
    try:
        again = G.folder_fingerprint(tiny_model_dir)
    finally:
        os.utime(cfg_file, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert calls == [cfg_file] and again["scheduler/scheduler_config.json"] == "x"


def test_file_hashes_persist_across_processes(tmp_path, monkeypatch):
    """A new process (empty in-memory cache) reads a weight file's hash from disk instead of
    hashing gigabytes again; an edited file, a torn cache file or an unwritable cache folder only
    cost a fresh hash, never a wrong one or a failure."""
    import hashlib

    import tdgen.model as G

    monkeypatch.setenv("TDGEN_CACHE_DIR", str(tmp_path / "cache"))
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"weights" * 1000)
    truth = hashlib.sha256(weights.read_bytes()).hexdigest()
    real, calls = G.sha256_file, []
    monkeypatch.setattr(G, "sha256_file", lambda p: calls.append(p) or real(p))
    monkeypatch.setattr(G, "_HASH_CACHE", {})
    assert G._hash_cached(weights) == truth and len(calls) == 1
    assert G.hash_cache_file().is_file()

    monkeypatch.setattr(G, "_HASH_CACHE", {})  # "a new process"
    assert G._hash_cached(weights) == truth and len(calls) == 1

    weights.write_bytes(b"edited" * 1000)  # new size and mtime: hashed again
    monkeypatch.setattr(G, "_HASH_CACHE", {})
    assert G._hash_cached(weights) == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert len(calls) == 2

    G.hash_cache_file().write_text("{torn")  # a half-written cache file is ignored, then rewritten
    monkeypatch.setattr(G, "_HASH_CACHE", {})
    assert G._hash_cached(weights) == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert len(calls) == 3 and json.loads(G.hash_cache_file().read_text())

    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    monkeypatch.setenv("TDGEN_CACHE_DIR", str(blocker / "cache"))  # cannot be created
    monkeypatch.setattr(G, "_HASH_CACHE", {})
    assert G._hash_cached(weights) == hashlib.sha256(weights.read_bytes()).hexdigest()


def test_cached_hub_model_loads_offline_with_its_commit(offline_hub, tiny_model_dir):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = offline_hub / "models--tdgen-test--cached-sd"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    m = load_model(ModelConfig(id="tdgen-test/cached-sd"), "cpu")
    assert m.source == {"id": "tdgen-test/cached-sd", "revision": commit}
    assert m.model_id == "tdgen-test/cached-sd"


def test_missing_hub_model_offline_names_the_fix(offline_hub):
    with pytest.raises(ModelNotFoundError) as e:
        load_model(ModelConfig(id="tdgen-test/definitely-not-cached"), "cpu")
    msg = str(e.value)
    assert "tdgen-test/definitely-not-cached" in msg
    assert "hf download" in msg and "--model" in msg and "offline" in msg
    assert "\n" not in msg


def test_pickled_weights_are_refused(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(ModelFormatError, match="safetensors"):
        load_model(ModelConfig(id=str(tmp_path)), "cpu")


def test_folder_missing_a_component_names_it(tiny_model_dir, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(tiny_model_dir, partial, ignore=shutil.ignore_patterns("unet"))
    with pytest.raises(ModelNotFoundError, match="unet"):
        load_model(ModelConfig(id=str(partial)), "cpu")


def test_nonexistent_folder(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_model(ModelConfig(id=str(tmp_path / "nope")), "cpu")


# -------------------------------------------------------------------------------------------
# Prompts and views


@pytest.mark.parametrize(
    "az, name",
    [(0, "front"), (44, "front"), (-44, "front"), (45, "front"), (46, "side"), (-46, "side"),
     (134, "side"), (-134, "side"), (135, "back"), (180, "back"), (-180, "back"),
     (270, "side"), (-270, "side"), (360, "front"), (225, "back")],
)
def test_view_name(az, name):
    assert view_name(az) == name
    assert view_index(torch.tensor([float(az)])).item() == ["front", "side", "back"].index(name)


def test_encode_prompt_views(model, emb):
    assert set(emb.views) == {"front", "side", "back"}
    d = model.unet.config.cross_attention_dim
    assert emb.uncond.shape == (1, 77, d)
    assert all(v.shape == (1, 77, d) for v in emb.views.values())
    assert not torch.allclose(emb.views["front"], emb.views["back"])
    assert not torch.allclose(emb.views["front"], emb.uncond)

    plain = encode_prompt(model, "a red chair", negative="blurry", view_prompts=False)
    assert set(plain.views) == {"none"}
    assert not torch.allclose(plain.uncond, emb.uncond)  # the negative prompt is used

    cond = view_embeddings(emb, torch.tensor([10.0, 90.0, 180.0, -30.0]))
    assert cond.shape == (4, 77, d)
    for row, name in zip(cond, ["front", "side", "back", "front"]):
        assert torch.equal(row, emb.views[name][0])
    assert view_embeddings(plain, torch.tensor([0.0, 180.0])).shape == (2, 77, d)


# -------------------------------------------------------------------------------------------
# SDS


@pytest.mark.parametrize("azimuths", [(0.0,), (0.0, 180.0)])
def test_sds_gradient_is_weighted_noise_residual(model, emb, azimuths):
    b = len(azimuths)
    cfg = Stage1Config(guidance_scale=7.5, t_schedule="anneal", t_max=0.98)
    seed, progress = 123, 0.3
    sds = SDSGuidance(model, emb, cfg, torch.Generator().manual_seed(seed))
    latents = torch.randn(b, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    latents.requires_grad_(True)
    loss = sds.latent_loss(latents, torch.tensor(azimuths), progress)
    loss.backward()

    # Independent reference: same draw (anneal draws only ε), SD's ᾱ, one plain UNet call.
    t = round((0.98 - 0.96 * progress) * 1000)
    noise = torch.randn(b, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    ab = _sd_alphas_cumprod()[t]
    noisy = ab.sqrt() * latents.detach() + (1 - ab).sqrt() * noise
    cond = torch.cat([emb.views[view_name(a)] for a in azimuths])
    text = torch.cat([emb.uncond.expand(b, -1, -1), cond])
    with torch.no_grad():
        out = model.unet(torch.cat([noisy, noisy]), torch.full((2 * b,), t),
                         encoder_hidden_states=text).sample
    eps_u, eps_c = out[:b], out[b:]
    eps_hat = eps_u + 7.5 * (eps_c - eps_u)
    expected = (1 - ab) * (eps_hat - noise)

    assert sds.last_t.tolist() == [t] * b
    torch.testing.assert_close(sds.last_w, torch.full((b,), float(1 - ab)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(latents.grad, expected / b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss, 0.5 * expected.pow(2).sum() / b, rtol=1e-4, atol=1e-5)


def test_anneal_schedule():
    cfg = Stage1Config(t_schedule="anneal", t_max=0.98)
    g = torch.Generator().manual_seed(0)
    ts = [sample_timesteps(cfg, 1000, p / 20, 2, g, "cpu") for p in range(21)]
    firsts = [int(t[0]) for t in ts]
    assert firsts[0] == 980 and firsts[-1] == 20
    assert all(a >= b for a, b in zip(firsts, firsts[1:]))
    assert all(int(t[0]) == int(t[1]) for t in ts)
    assert firsts[10] == 500


def test_random_schedule_bounds():
    cfg = Stage1Config(t_schedule="random", t_max=0.98)
    g = torch.Generator().manual_seed(0)
    early = sample_timesteps(cfg, 1000, 0.0, 4000, g, "cpu")
    assert early.min() >= 20 and early.max() <= 980
    assert early.min() < 100 and early.max() > 900  # really spread over the range
    mid = sample_timesteps(cfg, 1000, 0.5, 4000, g, "cpu")
    assert mid.min() >= 20 and mid.max() <= 500 and mid.max() > 450
    late = sample_timesteps(cfg, 1000, 1.0, 64, g, "cpu")
    assert (late == 20).all()


def test_nan_guard_zeroes_and_counts(model, emb):
    sds = SDSGuidance(model, emb, Stage1Config(), torch.Generator().manual_seed(0))
    latents = torch.randn(1, 4, 8, 8)
    latents[0, 0, 0, 0] = float("nan")
    latents.requires_grad_(True)
    loss = sds.latent_loss(latents, torch.tensor([0.0]), 0.5)
    # The value is NaN so stage 1's guard skips the step (a zeroed gradient read as a finite loss
    # would have stepped Adam and counted as a good step).
    assert torch.isnan(loss)
    loss.backward()
    assert sds.nan_count == 1
    assert torch.isfinite(latents.grad).all() and (latents.grad == 0).all()
    ok = torch.randn(1, 4, 8, 8, requires_grad=True)
    sds.latent_loss(ok, torch.tensor([0.0]), 0.5).backward()
    assert sds.nan_count == 1 and ok.grad.abs().sum() > 0


def test_sds_loss_from_images_reaches_pixels(model):
    cfg = Stage1Config(encode_resolution=64, guidance_scale=10.0)
    sds = SDSGuidance(model, "a red chair", cfg, torch.Generator().manual_seed(0))
    assert set(sds.embeddings.views) == {"front", "side", "back"}
    images = torch.rand(2, 3, 32, 32, requires_grad=True)
    assert sds.encode_images(images).shape == (2, 4, 8, 8)  # resized to 64 first
    loss = sds.loss(images, _cams(0.0, 90.0), torch.ones(2, 3), 0.2)
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0

    native = SDSGuidance(model, sds.embeddings, dataclasses.replace(cfg, encode_resolution=0),
                         torch.Generator().manual_seed(0))
    assert native.encode_images(images).shape == (2, 4, 4, 4)  # 0 keeps the render size


def _image_cfg(**kw):
    # The image part's CFG is its own (7.5 here), not the latent part's guidance_scale.
    base = dict(guidance_scale=20.0, sds_image_guidance=7.5, t_schedule="anneal", t_max=0.98,
                encode_resolution=64, sds_space="image", sds_image_start=0.0)
    return Stage1Config(**{**base, **kw})


@pytest.mark.parametrize("azimuths", [(0.0,), (0.0, 180.0)])
def test_image_space_gradient_is_weighted_residual_to_decoded_target(model, emb, azimuths):
    b = len(azimuths)
    seed, progress = 123, 0.3
    sds = SDSGuidance(model, emb, _image_cfg(), torch.Generator().manual_seed(seed))
    # Some values outside [0, 1] (additive splats reach ~2): their residual must still count.
    images = torch.rand(b, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 1.4 - 0.2
    images.requires_grad_(True)
    loss = sds.loss(images, _cams(*azimuths), torch.ones(b, 3), progress)
    loss.backward()

    # Independent reference: the encoder's posterior sample, then ε, from the same generator;
    # SD's ᾱ; one plain UNet call; x̂0 decoded by the VAE.
    vae, sf = model.vae, model.vae.config.scaling_factor
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        z = vae.encode(images.detach().clamp(0, 1) * 2 - 1).latent_dist.sample(generator=g) * sf
        noise = torch.randn(z.shape, generator=g)
        t = round((0.98 - 0.96 * progress) * 1000)
        ab = _sd_alphas_cumprod()[t]
        noisy = ab.sqrt() * z + (1 - ab).sqrt() * noise
        cond = torch.cat([emb.views[view_name(a)] for a in azimuths])
        text = torch.cat([emb.uncond.expand(b, -1, -1), cond])
        out = model.unet(torch.cat([noisy, noisy]), torch.full((2 * b,), t),
                         encoder_hidden_states=text).sample
        eps_hat = out[:b] + 7.5 * (out[b:] - out[:b])
        x0 = (noisy - (1 - ab).sqrt() * eps_hat) / ab.sqrt()
        target = ((vae.decode(x0 / sf).sample + 1) / 2).clamp(0, 1)
    expected = (1 - ab) * (images.detach() - target)

    assert sds.last_t.tolist() == [t] * b
    torch.testing.assert_close(sds.last_target, target, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(images.grad, expected / b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss, 0.5 * expected.pow(2).sum() / b, rtol=1e-4, atol=1e-5)
    assert (images.grad[images.detach() > 1] > 0).any()  # not cut off by the encoder's clamp


def test_image_space_runs_the_encoder_forward_only(model, emb):
    seen = []
    hook = model.vae.encoder.register_forward_hook(lambda m, i, o: seen.append(o.requires_grad))
    try:
        gens = {}
        for space in ("latent", "image"):
            gens[space] = torch.Generator().manual_seed(0)
            cfg = dataclasses.replace(_image_cfg(), sds_space=space)
            sds = SDSGuidance(model, emb, cfg, gens[space])
            images = torch.rand(1, 3, 32, 32, requires_grad=True)
            sds.loss(images, _cams(0.0), torch.ones(1, 3), 0.5).backward()
            assert images.grad.abs().sum() > 0  # resized to 64, and the gradient still arrives
    finally:
        hook.remove()
    assert seen == [True, False]  # latent: a graph through the encoder; image: none
    # Same draws in both spaces (posterior sample, ε), so seeds stay comparable.
    assert torch.equal(gens["latent"].get_state(), gens["image"].get_state())


def test_image_space_starts_after_latent_steps(model, emb):
    """Before `sds_image_start` the image mode runs latent SDS (the shape forms first)."""
    sds = SDSGuidance(model, emb, _image_cfg(sds_image_start=0.3),
                      torch.Generator().manual_seed(0))
    seen = []
    hook = model.vae.encoder.register_forward_hook(lambda m, i, o: seen.append(o.requires_grad))
    try:
        for progress in (0.0, 0.29, 0.3, 0.9):
            images = torch.rand(1, 3, 64, 64, requires_grad=True)
            sds.loss(images, _cams(0.0), torch.ones(1, 3), progress).backward()
    finally:
        hook.remove()
    assert seen == [True, True, False, False]


def test_image_space_nan_guard(model, emb, monkeypatch):
    import tdgen.guidance as G

    sds = SDSGuidance(model, emb, _image_cfg(), torch.Generator().manual_seed(0))

    def step(images):
        images.requires_grad_(True)
        loss = sds.loss(images, _cams(0.0), torch.ones(1, 3), 0.5)
        loss.backward()
        assert torch.isfinite(images.grad).all()
        return loss, images.grad

    bad = torch.rand(1, 3, 64, 64)
    bad[0, 0, 5, 5] = float("nan")  # a non-finite render
    loss, grad = step(bad)
    assert torch.isnan(loss) and (grad == 0).all() and sds.nan_count == 1

    with monkeypatch.context() as m:  # a non-finite decoded target
        m.setattr(G, "decode_latents", lambda model, z: torch.full((1, 3, 64, 64), float("nan")))
        loss, grad = step(torch.rand(1, 3, 64, 64))
    assert torch.isnan(loss) and (grad == 0).all() and sds.nan_count == 2

    with monkeypatch.context() as m:  # a non-finite ε̂ (an fp16 overflow in the UNet)
        m.setattr(G, "predict_noise_cfg", lambda *a, **k: torch.full((1, 4, 8, 8), float("inf")))
        loss, grad = step(torch.rand(1, 3, 64, 64))
    assert torch.isnan(loss) and (grad == 0).all() and sds.nan_count == 3

    loss, grad = step(torch.rand(1, 3, 64, 64))
    assert torch.isfinite(loss) and grad.abs().sum() > 0 and sds.nan_count == 3


def test_image_space_needs_a_vae_decoder(model, emb):
    with pytest.raises(ValueError, match="sds_space=latent"):
        SDSGuidance(dataclasses.replace(model, vae=None), emb, _image_cfg(),
                    torch.Generator().manual_seed(0))


def test_v_prediction_is_converted_to_epsilon(model, emb):
    from diffusers import DDIMScheduler

    vmodel = dataclasses.replace(
        model, scheduler=DDIMScheduler.from_config(model.scheduler.config,
                                                   prediction_type="v_prediction"))
    noisy = torch.randn(1, 4, 8, 8)
    t = torch.tensor([400])
    cond, uncond = emb.views["front"], emb.uncond
    v_hat = predict_noise_cfg(model, noisy, t, cond, uncond, 5.0)  # the raw output, as ε model
    eps_hat = predict_noise_cfg(vmodel, noisy, t, cond, uncond, 5.0)
    ab = _sd_alphas_cumprod()[400]
    torch.testing.assert_close(eps_hat, ab.sqrt() * v_hat + (1 - ab).sqrt() * noisy,
                               rtol=1e-4, atol=1e-5)


def test_tiny_sds_encoder(tiny_model_dir, tmp_path, offline_hub):
    from diffusers import AutoencoderTiny

    tiny_dir = tmp_path / "taesd"
    torch.manual_seed(0)
    AutoencoderTiny(encoder_block_out_channels=(8, 8, 8, 8),
                    decoder_block_out_channels=(8, 8, 8, 8)).save_pretrained(tiny_dir)
    cfg = ModelConfig(id=str(tiny_model_dir), sds_encoder="tiny", tiny_encoder_id=str(tiny_dir))
    m = load_model(cfg, "cpu")
    assert type(m.tiny_vae).__name__ == "AutoencoderTiny"
    assert "sds_encoder" in m.source
    sds = SDSGuidance(m, "a chair", Stage1Config(encode_resolution=64),
                      torch.Generator().manual_seed(0))
    images = torch.rand(1, 3, 64, 64, requires_grad=True)
    assert sds.encode_images(images).shape == (1, 4, 8, 8)
    sds.loss(images, _cams(0.0), torch.ones(1, 3), 0.5).backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    # sds_space=image: the tiny encoder's latents, decoded by the full VAE kept beside it.
    img = SDSGuidance(m, sds.embeddings, Stage1Config(encode_resolution=64, sds_space="image",
                                                      sds_image_start=0.0),
                      torch.Generator().manual_seed(0))
    images.grad = None
    img.loss(images, _cams(0.0), torch.ones(1, 3), 0.5).backward()
    assert img.last_target.shape == (1, 3, 64, 64) and img.nan_count == 0
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0

    with pytest.raises(ModelNotFoundError, match="hf download"):
        load_model(dataclasses.replace(cfg, tiny_encoder_id="tdgen-test/no-taesd"), "cpu")


def test_invalid_hub_id(offline_hub):
    with pytest.raises(ModelNotFoundError, match="valid hub id"):
        load_model(ModelConfig(id="bad id with spaces"), "cpu")


# -------------------------------------------------------------------------------------------
# img2img


def test_img2img_target(model, emb):
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    cond, uncond = emb.views["front"], emb.uncond

    def run(strength, seed=0):
        return img2img_target(model, images, cond, uncond, strength, 4, 7.5,
                              torch.Generator().manual_seed(seed))

    a = run(0.5)
    assert a.shape == (1, 3, 64, 64) and a.dtype == torch.float32
    assert a.min() >= 0 and a.max() <= 1 and not a.requires_grad
    assert torch.equal(a, run(0.5))  # seeded → reproducible
    assert not torch.allclose(a, run(0.0), atol=1e-3)  # strength changes the result
    assert torch.equal(run(1.0), images)  # the whole schedule skipped → the input back


def test_latent_ddim_never_clips_its_x0_estimate(model, emb):
    """The tiny model ships SD's PNDM config, which has no clip_sample key (DDIM's default is
    True): the loader and img2img must still treat latents as unbounded."""
    from diffusers import DDIMScheduler

    assert model.scheduler.config.clip_sample is False
    sched = model.scheduler
    sched.set_timesteps(10)
    t = sched.timesteps[0]
    big = torch.full((1, 4, 8, 8), 3.0)
    x0 = sched.step(torch.zeros_like(big), t, big).pred_original_sample
    assert float(x0.min()) > 3.0  # x0 = x_t / √ᾱ_t, not clipped to 1

    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    clipping = dataclasses.replace(model, scheduler=DDIMScheduler.from_config(
        model.scheduler.config, clip_sample=True))
    a, b = (img2img_target(m, images, emb.views["front"], emb.uncond, 0.3, 10, 7.5,
                           torch.Generator().manual_seed(0)) for m in (model, clipping))
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("strength, calls", [(0.8, 10), (0.95, 3), (0.0, 50)])
def test_img2img_strength_skips_that_fraction_of_the_schedule(model, emb, monkeypatch, strength, calls):
    """DreamGaussian's convention: denoise from index int(steps·strength) of a 50-step schedule."""
    import tdgen.guidance as G

    seen = []
    real = G.predict_noise_cfg

    def counting(model, noisy, t, *a, **k):
        seen.append(int(t[0]))
        return real(model, noisy, t, *a, **k)

    monkeypatch.setattr(G, "predict_noise_cfg", counting)
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    img2img_target(model, images, emb.views["front"], emb.uncond, strength, 50, 7.5, torch.Generator().manual_seed(0))
    assert len(seen) == calls
    assert seen == sorted(seen, reverse=True)
    if strength == 0.8:
        assert 150 <= seen[0] <= 220  # a light re-noise, not a new image


@pytest.mark.gpu
def test_cuda_graph_matches_eager(tiny_model_dir):
    device = torch.device("cuda")
    m = load_model(ModelConfig(id=str(tiny_model_dir), cuda_graphs=True), device)
    assert m.dtype == torch.float16 and m.cuda_graphs
    e = encode_prompt(m, "a chair")
    g = torch.Generator(device).manual_seed(0)
    t = torch.tensor([500], device=device)
    for _ in range(3):  # capture, then replays with fresh inputs
        noisy = torch.randn(1, 4, 64, 64, device=device, generator=g)
        eager = predict_noise_cfg(m, noisy, t, e.views["side"], e.uncond, 7.5, use_graphs=False)
        graphed = predict_noise_cfg(m, noisy, t, e.views["side"], e.uncond, 7.5, use_graphs=True)
        torch.testing.assert_close(graphed, eager, rtol=2e-2, atol=2e-2)
    assert any(m.graphs.values()), "graph capture fell back to eager"


def _refuse_compile(monkeypatch) -> None:
    """torch.compile raising, as a missing or failing compiler does."""
    monkeypatch.setattr(torch, "compile", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no")))


def _compiling_model(tiny_model_dir, tmp_path, monkeypatch, part: str, compile_ok: bool):
    """The tiny model on CUDA with `compile_<part>` on and its inductor cache in `tmp_path`; with
    `compile_ok` False, torch.compile raises, as a missing or failing compiler does."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    m = load_model(ModelConfig(id=str(tiny_model_dir), **{f"compile_{part}": True}), torch.device("cuda"))
    assert getattr(m, f"compile_{part}")
    if not compile_ok:
        _refuse_compile(monkeypatch)
    return m


def _through_compile(m, part: str, compile_ok: bool, fn):
    """`fn()`; where compiling fails it must warn, name the setting, turn `compile_<part>` off and
    still return the eager result (a failing compiler must leave the asset to eager)."""
    if compile_ok:
        return fn()
    with pytest.warns(UserWarning, match=f"compile_{part}=false"):
        out = fn()
    assert not getattr(m, f"compile_{part}")
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("compile_ok", [True, False])
def test_compiled_encoder_matches_eager(tiny_model_dir, tmp_path, monkeypatch, compile_ok):
    m = _compiling_model(tiny_model_dir, tmp_path, monkeypatch, "encoder", compile_ok)
    x = (torch.rand(1, 3, 64, 64, device=m.device) * 2 - 1).half().requires_grad_(True)
    g = torch.randn(1, 4, 8, 8, device=m.device)
    eager_mean = m.vae.encode(x).latent_dist.mean
    (eager_grad,) = torch.autograd.grad((eager_mean.float() * g).sum(), x)
    dist = _through_compile(m, "encoder", compile_ok, lambda: m.latent_dist(x))
    (grad,) = torch.autograd.grad((dist.mean.float() * g).sum(), x)
    torch.testing.assert_close(dist.mean, eager_mean, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(grad, eager_grad, rtol=2e-2, atol=2e-2)
    assert (m._compiled_moments is not None) == compile_ok


def test_cpu_encoder_is_the_vae_itself(model):
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    torch.testing.assert_close(model.latent_dist(x).mean, model.vae.encode(x).latent_dist.mean)
    assert not model.compile_encoder  # compile is a CUDA choice only


@pytest.mark.gpu
@pytest.mark.parametrize("compile_ok", [True, False])
def test_compiled_decoder_matches_eager(tiny_model_dir, tmp_path, monkeypatch, compile_ok):
    m = _compiling_model(tiny_model_dir, tmp_path, monkeypatch, "decoder", compile_ok)
    z = torch.randn(1, 4, 8, 8, device=m.device).half()
    eager = m.vae.decode(z).sample
    out = _through_compile(m, "decoder", compile_ok, lambda: m.decode(z))
    assert out.shape == eager.shape == (1, 3, 64, 64)
    torch.testing.assert_close(out, eager, rtol=2e-2, atol=2e-2)
    assert (m._compiled_decode is not None) == compile_ok


def test_cpu_decoder_is_the_vae_itself(model):
    z = torch.randn(1, 4, 8, 8)
    torch.testing.assert_close(model.decode(z), model.vae.decode(z).sample)
    assert not model.compile_decoder  # compile is a CUDA choice only


@pytest.mark.gpu
@pytest.mark.parametrize("compile_ok", [True, False])
def test_compiled_unet_matches_eager_inside_the_graph(tiny_model_dir, tmp_path, monkeypatch, compile_ok):
    """model.compile_unet: the CFG prediction replayed from a CUDA graph of the compiled UNet
    equals the eager one; a failing compiler leaves the graph of the eager UNet."""
    m = _compiling_model(tiny_model_dir, tmp_path, monkeypatch, "unet", compile_ok)
    e = encode_prompt(m, "a chair")
    g = torch.Generator(device=m.device).manual_seed(0)
    noisy = torch.randn(1, 4, 8, 8, device=m.device, generator=g)
    t = torch.tensor([500], device=m.device)
    out = _through_compile(m, "unet", compile_ok, lambda: predict_noise_cfg(
        m, noisy, t, e.views["side"], e.uncond, 7.5, use_graphs=True))
    assert any(m.graphs.values()), "graph capture fell back to eager"
    assert (m._compiled_unet is not None) == compile_ok
    m.compile_unet = False
    plain = predict_noise_cfg(m, noisy, t, e.views["side"], e.uncond, 7.5, use_graphs=False)
    torch.testing.assert_close(out, plain, rtol=2e-2, atol=2e-2)


def test_cpu_unet_is_not_compiled(tiny_model_dir):
    m = load_model(ModelConfig(id=str(tiny_model_dir), compile_unet=True), torch.device("cpu"))
    assert not m.compile_unet and m._compiled_unet is None  # compile is a CUDA choice only
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 10])
    emb = encode_prompt(m, "a chair").uncond.expand(2, -1, -1)
    torch.testing.assert_close(m.unet_forward(x, t, emb), m.unet(x, t, encoder_hidden_states=emb).sample)


@pytest.mark.parametrize("part, cache, label", [("encoder", "_compiled_moments", "VAE encoder"),
                                                ("decoder", "_compiled_decode", "VAE decoder"),
                                                ("unet", "_compiled_unet", "UNet")])
def test_a_failing_compile_warns_once_and_turns_itself_off(model, monkeypatch, part, cache, label):
    m = dataclasses.replace(model, compile_encoder=True, compile_decoder=True, compile_unet=True)
    _refuse_compile(monkeypatch)
    with pytest.warns(UserWarning, match=f"{label} failed.*model.compile_{part}=false"):
        assert m._run_compiled(part, cache, lambda x: x + 1, torch.zeros(2)) is None
    assert getattr(m, f"compile_{part}") is False and getattr(m, cache) is None
    for other in {"encoder", "decoder", "unet"} - {part}:
        assert getattr(m, f"compile_{other}") is True  # only the part that failed is turned off
