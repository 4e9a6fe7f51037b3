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
    # 30 steps: Adam moves a correction of the logits at a decaying lr, each texel seen only by
    # some views and trusted less near the silhouette: mid grey reaches ~0.75 green (measured).
    cfg = replace(CFG, refine_steps=30, refine_lr=0.2, refine_strength_start=0.3,
                  refine_strength_end=0.9)
    out = refine_texture(mesh, start_texture(), Model(), emb, cfg, "cpu", make_generator(1))
    inside = chart_mask(mesh, 64)
    green = out[inside]
    assert green[:, 1].mean() > 0.7 and green[:, 0].mean() < 0.3 and green[:, 2].mean() < 0.3
    assert [round(c[1], 6) for c in calls] == [round(strength_at(i, 30, cfg), 6) for i in range(30)]
    assert calls[0][1] == pytest.approx(0.3) and calls[-1][1] == pytest.approx(0.9)
    assert all(c[2] == cfg.refine_ddim_steps and c[3] == cfg.refine_guidance_scale for c in calls)
    assert all(c[4] == torch.float16 for c in calls)  # model inputs in the model's dtype
    assert len({c[0] for c in calls}) >= 2  # random azimuths pick different view prompts


def _truth_targets(monkeypatch, mesh, truth, noise_std=0.0, noise=None):
    """Make img2img return `truth` [S, S, 3] rendered from the refinement's own camera (plus
    fresh pixel noise of `noise_std`, clamped, if given): ideal or noisy view-consistent targets."""
    import tdgen.guidance as guidance
    import tdgen.refine as refine
    from tdgen.raster import render_mesh

    last = {}
    real_framing = refine.framing_cameras

    def recording_framing(*args, **kw):
        last["cam"] = real_framing(*args, **kw)
        return last["cam"]

    def truth_img2img(model, images, cond, uncond, strength, ddim_steps, guidance_scale, generator):
        rgb, _ = render_mesh(mesh, truth, last["cam"], torch.ones(1, 3))
        rgb = rgb.permute(0, 3, 1, 2)
        if noise_std == 0.0:
            return rgb
        return (rgb + noise_std * torch.randn(rgb.shape, generator=noise)).clamp(0, 1)

    monkeypatch.setattr(refine, "framing_cameras", recording_framing)
    monkeypatch.setattr(guidance, "img2img_target", truth_img2img)


def test_ideal_targets_never_make_the_bake_worse(mesh, monkeypatch):
    """Issue 9, item 1: with perfect, view-consistent img2img targets (the true texture rendered
    from the refinement camera), refinement at the default lr must bring a noisy bake closer to
    the truth. Adam at lr 0.2 directly on colours overshoots by ~0.2 a step and ends worse than
    the bake; on logits (DreamGaussian) the same lr is ~0.05 in colour at mid grey."""
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    checker = (((yy // 8) + (xx // 8)) % 2).float()[..., None]
    truth = checker * torch.tensor([0.85, 0.25, 0.15]) + (1 - checker) * torch.tensor([0.2, 0.45, 0.8])
    bake = (truth + 0.08 * torch.randn(64, 64, 3, generator=g)).clamp(0, 1)
    _truth_targets(monkeypatch, mesh, truth)

    emb = _blank_embeddings()
    cfg = replace(TextureConfig(), size=64, refine_resolution=64)  # default steps and lr
    out = refine_texture(mesh, bake, _StubModel(), emb, cfg, "cpu", make_generator(0))
    inside = chart_mask(mesh, 64)

    def rms(t):
        return float((t - truth)[inside].pow(2).mean().sqrt())

    # measured: bake 0.079; Adam on colours at lr 0.2 (before) 0.150; on per-texel logits 0.033;
    # the default correction at half the render size (32² here, lr 0.1 decaying) 0.069: it cannot
    # reach the bake's per-texel noise, which is what keeps it from turning target noise into
    # texture noise (next test)
    print(f"ideal-target refinement: bake rms {rms(bake):.4f} → {rms(out):.4f}")
    assert rms(out) < 0.9 * rms(bake), (rms(bake), rms(out))


def test_noisy_targets_do_not_become_salt_and_pepper(mesh, monkeypatch):
    """Each view's target is the true texture rendered plus fresh pixel noise (a weak prior's
    img2img). Per-texel parameters under Adam take a ~lr step on every texel a view touches,
    whatever the gradient's size, so the noise lands in the texture; the default coarse
    correction averages it over many pixels."""
    truth = torch.tensor([0.7, 0.4, 0.2]).expand(64, 64, 3).clone()
    bake = (truth + 0.03 * torch.randn(64, 64, 3, generator=torch.Generator().manual_seed(0)))
    _truth_targets(monkeypatch, mesh, truth, 0.1, torch.Generator().manual_seed(1))
    inside = chart_mask(mesh, 64)

    def rms(t):
        return float((t - truth)[inside].pow(2).mean().sqrt())

    def run(**kw):
        cfg = replace(TextureConfig(), size=64, refine_resolution=64, **kw)
        return rms(refine_texture(mesh, bake, _StubModel(), _blank_embeddings(), cfg, "cpu",
                                  make_generator(0)))

    default = run()  # default steps, lr (0.1), correction (32²)
    coarse, texel = run(refine_lr=0.2), run(refine_lr=0.2, refine_correction_size=64)
    print(f"noisy targets: bake {rms(bake):.4f}, default {default:.4f}; at lr 0.2 coarse "
          f"{coarse:.4f}, per-texel {texel:.4f}")
    # measured: bake 0.030, default 0.032; at lr 0.2 coarse 0.037, per-texel 0.053 (0.052 / 0.092
    # at noise 0.2 with a constant lr). Unbiased noise still walks the texture a little; per-texel
    # it walks it far.
    assert default < 1.15 * rms(bake)
    assert texel > 1.3 * coarse


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
    if background == "white":  # measured: +0.29 (+0.40 before the lr decayed and edges were trusted less)
        assert set(backgrounds) == {1.0}
        assert drift > 0.2
    else:  # measured: -0.06 to +0.05, RMS 0.12-0.14 (which views came last)
        assert {0.0, 1.0} <= set(backgrounds)
        assert abs(drift) < 0.1 and float(change.pow(2).mean().sqrt()) < 0.2


def test_edge_weight_ramps_up_inside_the_silhouette():
    from tdgen.refine import edge_weight

    alpha = torch.zeros(1, 24, 24, 1)
    alpha[:, 4:20, 4:20] = 1.0
    w = edge_weight(alpha, 4)[0, 12, :, 0]
    assert torch.equal(edge_weight(alpha, 0), alpha)
    assert w[:4].eq(0).all() and w[20:].eq(0).all()  # never outside the coverage
    assert w[4] < w[5] < w[6] < w[7] < w[8] == 1.0 and w[8:16].eq(1).all()  # d/px from each edge
    assert torch.equal(w, w.flip(0))


def test_edge_weight_keeps_background_bleed_out_of_the_texture(mesh, monkeypatch):
    """A stand-in img2img that paints the object's outermost 2 pixels white (what SD's 8×8-latent
    autoencoder does with a white background) and the true grey elsewhere: trusting every covered
    pixel whitens the texture; the default ramp keeps it near the truth."""
    import torch.nn.functional as F

    import tdgen.guidance as guidance

    def bleeding_img2img(model, images, cond, uncond, strength, ddim_steps, guidance_scale, generator):
        img = images.float()
        bg = (img - 1.0).abs().amax(1, keepdim=True) < 1e-4  # [B, 1, H, W] white background
        near = F.max_pool2d(bg.float(), 5, stride=1, padding=2) > 0  # within 2 px of it
        return torch.where(near, torch.ones_like(img), torch.full_like(img, 0.4))  # else: truth

    monkeypatch.setattr(guidance, "img2img_target", bleeding_img2img)
    grey = torch.full((64, 64, 3), 0.4)
    inside = chart_mask(mesh, 64)
    drift = {}
    for px in (0, 8):
        cfg = replace(CFG, refine_steps=20, refine_lr=0.2, refine_edge_px=px)
        out = refine_texture(mesh, grey, _StubModel(), _blank_embeddings(), cfg, "cpu",
                             make_generator(3))
        drift[px] = float((out[inside] - 0.4).mean())
    assert drift[0] > 0.1 and abs(drift[8]) < 0.6 * drift[0]  # measured: +0.17, +0.08
