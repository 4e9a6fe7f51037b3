"""UV-space texture refinement: runs against the tiny model, moves the texture, stays in [0, 1]."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import trimesh

from tdgen.config import ModelConfig, TextureConfig
from tdgen.meshdata import Mesh
from tdgen.refine import refine_texture, strength_at
from tdgen.runtime import make_generator
from tdgen.texture import chart_mask

CFG = TextureConfig(size=64, refine_steps=2, refine_resolution=64, refine_ddim_steps=10,
                    refine_lr=0.05)


@pytest.fixture(scope="module")
def mesh():
    from tdgen.unwrap import unwrap_mesh

    m = trimesh.creation.icosphere(subdivisions=1, radius=0.5)
    base = Mesh(m.vertices.astype(np.float32), m.faces.astype(np.int64),
                m.vertex_normals.astype(np.float32))
    return unwrap_mesh(base, TextureConfig(size=64, padding=2))


@pytest.fixture(scope="module")
def model_and_embeddings(tiny_model_dir):
    from tdgen.guidance import encode_prompt, load_model

    model = load_model(ModelConfig(id=str(tiny_model_dir)), "cpu")
    return model, encode_prompt(model, "a wooden barrel")


class _StubModel:
    """What refine_texture reads of a DiffusionModel once img2img_target is replaced."""
    device = torch.device("cpu")
    dtype = torch.float32


def _blank_embeddings():
    from tdgen.guidance import PromptEmbeddings

    return PromptEmbeddings(uncond=torch.zeros(1, 4, 8),
                            views={k: torch.zeros(1, 4, 8) for k in ("front", "side", "back")})


def start_texture():
    g = torch.Generator().manual_seed(0)
    return torch.rand(64, 64, 3, generator=g) * 0.5 + 0.25


def test_refine_with_tiny_model_changes_texture_within_range(mesh, model_and_embeddings):
    model, emb = model_and_embeddings
    tex = start_texture()
    before = tex.clone()
    events = []
    out = refine_texture(mesh, tex, model, emb, CFG, "cpu", make_generator(0), events.append)
    assert out.shape == (64, 64, 3) and out.dtype == torch.float32
    assert torch.equal(tex, before)  # the input is not modified in place
    assert (out - before).abs().max() > 1e-3
    assert out.min() >= 0 and out.max() <= 1
    assert [e.step for e in events] == [0, 1, 2] and all(e.stage == "refine" for e in events)
    assert all(np.isfinite(e.loss) for e in events[1:])
    # Gutters hold their nearest chart texel's colour again.
    inside = chart_mask(mesh, 64)
    from scipy.ndimage import distance_transform_edt

    _, (ri, ci) = distance_transform_edt(~inside.numpy(), return_indices=True)
    assert torch.equal(out, out[torch.from_numpy(ri), torch.from_numpy(ci)])


def test_zero_steps_is_a_no_op(mesh, model_and_embeddings):
    model, emb = model_and_embeddings
    tex = start_texture()
    out = refine_texture(mesh, tex, model, emb, replace(CFG, refine_steps=0), "cpu",
                         make_generator(0))
    assert out is tex


def test_moves_toward_targets_with_view_prompts_and_rising_strength(mesh, monkeypatch):
    """A stand-in img2img that returns solid green: the covered texels turn green, and each call
    gets the right view's embedding and a strength rising from start to end."""
    import tdgen.guidance as guidance

    calls = []

    def fake_img2img(model, images, cond, uncond, strength, ddim_steps, guidance_scale, generator):
        calls.append((cond[0, 0, 0].item(), strength, ddim_steps, guidance_scale, images.dtype))
        out = torch.zeros_like(images, dtype=torch.float32)
        out[:, 1] = 1.0
        return out

    monkeypatch.setattr(guidance, "img2img_target", fake_img2img)

    class Model:
        device = torch.device("cpu")
        dtype = torch.float16

    codes = {"front": 1.0, "side": 2.0, "back": 3.0}
    emb = guidance.PromptEmbeddings(
        uncond=torch.zeros(1, 4, 8),
        views={k: torch.full((1, 4, 8), v) for k, v in codes.items()},
    )
    # 30 steps: Adam moves the logits (DreamGaussian), so mid grey reaches > 0.9 in ~11 steps of
    # a texel that every view sees, and random views see each texel only part of the time.
    cfg = replace(CFG, refine_steps=30, refine_lr=0.2, refine_strength_start=0.3,
                  refine_strength_end=0.9)
    out = refine_texture(mesh, start_texture(), Model(), emb, cfg, "cpu", make_generator(1))
    inside = chart_mask(mesh, 64)
    green = out[inside]
    assert green[:, 1].mean() > 0.85 and green[:, 0].mean() < 0.2 and green[:, 2].mean() < 0.2
    assert [round(c[1], 6) for c in calls] == [round(strength_at(i, 30, cfg), 6) for i in range(30)]
    assert calls[0][1] == pytest.approx(0.3) and calls[-1][1] == pytest.approx(0.9)
    assert all(c[2] == cfg.refine_ddim_steps and c[3] == cfg.refine_guidance_scale for c in calls)
    assert all(c[4] == torch.float16 for c in calls)  # model inputs in the model's dtype
    assert len({c[0] for c in calls}) >= 2  # random azimuths pick different view prompts


def test_ideal_targets_never_make_the_bake_worse(mesh, monkeypatch):
    """Issue 9, item 1: with perfect, view-consistent img2img targets (the true texture rendered
    from the refinement camera), refinement at the default lr must bring a noisy bake closer to
    the truth. Adam at lr 0.2 directly on colours overshoots by ~0.2 a step and ends worse than
    the bake; on logits (DreamGaussian) the same lr is ~0.05 in colour at mid grey."""
    import tdgen.guidance as guidance
    import tdgen.refine as refine
    from tdgen.raster import render_mesh

    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    checker = (((yy // 8) + (xx // 8)) % 2).float()[..., None]
    truth = checker * torch.tensor([0.85, 0.25, 0.15]) + (1 - checker) * torch.tensor([0.2, 0.45, 0.8])
    bake = (truth + 0.08 * torch.randn(64, 64, 3, generator=g)).clamp(0, 1)

    last = {}
    real_framing = refine.framing_cameras

    def recording_framing(*args, **kw):
        last["cam"] = real_framing(*args, **kw)
        return last["cam"]

    def ideal_img2img(model, images, cond, uncond, strength, ddim_steps, guidance_scale, generator):
        rgb, _ = render_mesh(mesh, truth, last["cam"], torch.ones(1, 3))
        return rgb.permute(0, 3, 1, 2)

    monkeypatch.setattr(refine, "framing_cameras", recording_framing)
    monkeypatch.setattr(guidance, "img2img_target", ideal_img2img)

    emb = _blank_embeddings()
    cfg = replace(TextureConfig(), size=64, refine_resolution=64)  # default steps and lr
    out = refine_texture(mesh, bake, _StubModel(), emb, cfg, "cpu", make_generator(0))
    inside = chart_mask(mesh, 64)

    def rms(t):
        return float((t - truth)[inside].pow(2).mean().sqrt())

    # measured: bake 0.079; Adam on colours at lr 0.2 (before) 0.150; on logits 0.033
    print(f"ideal-target refinement: bake rms {rms(bake):.4f} → {rms(out):.4f}")
    assert rms(out) < 0.8 * rms(bake), (rms(bake), rms(out))


@pytest.mark.parametrize("background", ["white", "random"])
def test_background_bleed_averages_out_on_random_backgrounds(mesh, monkeypatch, background):
    """A stand-in denoiser that blurs (a weak prior's img2img bleeds the background into the
    object's edges): on a fixed white background a mid-grey texture drifts toward white; on
    stage 1's white-or-black backgrounds the drift cancels."""
    import torch.nn.functional as F

    import tdgen.guidance as guidance

    backgrounds = []

    def blurring_img2img(model, images, cond, uncond, strength, ddim_steps, guidance_scale, generator):
        backgrounds.append(float(images[0, :, 0, 0].float().mean()))  # a corner: background
        return F.avg_pool2d(images.float(), 9, stride=1, padding=4, count_include_pad=False)

    monkeypatch.setattr(guidance, "img2img_target", blurring_img2img)

    emb = _blank_embeddings()
    cfg = replace(CFG, refine_steps=40, refine_lr=0.2, refine_background=background)
    grey = torch.full((64, 64, 3), 0.5)
    out = refine_texture(mesh, grey, _StubModel(), emb, cfg, "cpu", make_generator(2))
    change = out[chart_mask(mesh, 64)] - 0.5
    drift = float(change.mean())
    if background == "white":  # measured: +0.40 for seeds 2-4, the texture nearly white
        assert set(backgrounds) == {1.0}
        assert drift > 0.3
    else:  # measured: -0.06 to +0.05, RMS 0.12-0.14 (which views came last)
        assert {0.0, 1.0} <= set(backgrounds)
        assert abs(drift) < 0.1 and float(change.pow(2).mean().sqrt()) < 0.2
