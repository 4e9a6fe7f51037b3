"""Known-answer distillation: the committed toy prior (benchmarks/toy_prior_model) must steer
stage 1 from the sphere to the object its prompt names, the right way round — and must not when
the SDS gradient's sign is flipped or the front/back view prompts are swapped (issue 9).

The object is the mug: handle on +X, logo on the front, so turned 180° its side-view silhouettes
swap sides and the IoU against the object vs against it turned tells front from back.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from benchmarks.toy_prior.evaluate import load_prior, stage1_config, stage1_recovery

PRIOR = Path(__file__).resolve().parents[1] / "benchmarks" / "toy_prior_model"
OBJECT = "mug"
# Stage 1 at 64 px, CI-sized: fewer steps and splats than toy_prior's own stage-1 check.
CI_STAGE1 = dict(steps=200, num_points=800, max_points=2000)

# Measured on the 2-core dev box with the committed prior of 2026-12-02 (IoU vs the mug / vs the
# mug turned 180°): normal .784 / .582, flipped sign .295 / .293, swapped view prompts .627 / .834;
# the three runs take ~90 s. With stage1.densify_fraction=0.2 (the default since): normal .788 / .555.
# With stage1.sds_space=image (the default since 2026-12-03): normal .875 / .594, flipped .095 /
# .095, swapped .589 / .869. With stage1.t_max=0.8 (the default since 2026-12-07): normal .868 /
# .596, flipped .106 / .106, swapped .588 / .868. (The first prior, 565 UNet steps: .821 / .616,
# .281 / .300, .592 / .804.)
IOU_MIN = 0.70
"""Silhouette IoU (16 held-out views) the recovered mug must exceed."""
FRONT_MARGIN = 0.10
"""How much better the result must match the mug than the mug turned 180°."""


@pytest.fixture(scope="module")
def prior():
    return load_prior(PRIOR, "cpu")


@pytest.fixture(scope="module")
def runs(prior):
    """Stage-1 results per mode, computed once each (each is ~30–60 s of CPU)."""
    cache: dict[str, dict] = {}

    def get(mode: str) -> dict:
        if mode not in cache:
            torch.manual_seed(0)
            cache[mode] = stage1_recovery(prior, OBJECT, stage1_config(**CI_STAGE1), seed=0,
                                          mode=mode, backend="torch")
            print(f"\n{mode}: {cache[mode]}")
        return cache[mode]

    return get


def recovered(r: dict) -> bool:
    return r["iou"] > IOU_MIN and r["iou"] - r["iou_turned"] > FRONT_MARGIN


@torch.no_grad()
def test_prior_denoises_better_with_the_right_prompt(prior):
    """The trap of issue 9: a prior whose ε-loss is the same with and without the prompt. On the
    mug's renders at mid noise the right prompt must beat the empty one and another object's."""
    from benchmarks.toy_prior.data import caption, render_views
    from benchmarks.toy_prior.objects import build_object
    from tdgen.config import Stage1Config
    from tdgen.guidance import encode_texts

    g = torch.Generator().manual_seed(0)
    az = torch.linspace(-180, 180, 17)[:-1]
    imgs = render_views(build_object(OBJECT), torch.zeros(16), az, torch.ones(16, 3), 64,
                        Stage1Config())  # [16, 64, 64, 3]
    x = imgs.permute(0, 3, 1, 2) * 2 - 1
    z = prior.vae.encode(x).latent_dist.mean * prior.vae.config.scaling_factor

    texts = [caption(OBJECT, a) for a in az.tolist()]
    losses = {}
    for name, t_texts in {"right": texts, "empty": [""] * 16,
                          "other": [s.replace("a mug", "a chair") for s in texts]}.items():
        emb = encode_texts(prior, t_texts)
        err = []
        for t in (300, 500, 700):
            noise = torch.randn(z.shape, generator=g)
            tt = torch.full((16,), t)
            zt = prior.scheduler.add_noise(z, noise, tt)
            eps = prior.unet(zt, tt, encoder_hidden_states=emb).sample
            err.append(float((eps - noise).pow(2).mean()))
        losses[name] = sum(err) / len(err)
    print(losses)  # measured: right .0082, empty .0121, another object's .0509
    assert losses["right"] < 0.97 * losses["empty"], losses
    assert losses["right"] < 0.9 * losses["other"], losses


@pytest.mark.slow  # one CPU stage-1 run, ~25–35 s
def test_stage1_recovers_the_named_object_the_right_way_round(runs):
    r = runs("normal")
    assert recovered(r), r
    assert r["nan_steps"] == 0


@pytest.mark.slow  # one CPU stage-1 run, ~25–35 s
def test_flipped_sds_sign_does_not_recover(runs):
    r = runs("flipped")
    assert not recovered(r), r
    assert r["iou"] < IOU_MIN - 0.2, r  # not a near miss: ascent drives the splats apart


@pytest.mark.slow  # one CPU stage-1 run, ~25–35 s
def test_swapped_view_prompts_come_out_back_to_front(runs):
    r = runs("swapped")
    assert not recovered(r), r
    assert r["iou_turned"] > r["iou"], r


@torch.no_grad()
def test_samples_show_the_object_the_prompt_names(prior):
    """DDIM + CFG from pure noise (the sample sheet's sampler) must draw the named object: each
    sample's foreground colours are nearest to that object's renders among the four objects.
    Catches a prompt-blind prior and a broken sampler (DDIM clipping latents to [-1, 1] drew a
    chair for every prompt)."""
    from benchmarks.toy_prior.data import render_views
    from benchmarks.toy_prior.evaluate import sample
    from benchmarks.toy_prior.objects import OBJECTS, PROMPTS, build_object
    from tdgen.config import Stage1Config

    def foreground_histogram(img: torch.Tensor) -> torch.Tensor:  # [N, H, W, 3] → [N, 27]
        bg = img[:, :2, :2].reshape(len(img), -1, 3).mean(1)  # corners are background
        fg = (img - bg[:, None, None]).abs().amax(-1) > 0.25  # [N, H, W]
        bins = (img.clamp(0, 0.999) * 3).long()
        code = bins[..., 0] * 9 + bins[..., 1] * 3 + bins[..., 2]
        h = torch.stack([torch.bincount(c[m], minlength=27).float() for c, m in zip(code, fg)])
        return h / h.sum(1, keepdim=True).clamp_min(1)

    az = torch.tensor([-90.0, 0.0, 90.0, 180.0])
    refs = {o: foreground_histogram(render_views(build_object(o), torch.zeros(4), az,
                                                 torch.zeros(4, 3), 64, Stage1Config())).mean(0)
            for o in OBJECTS}
    gen = torch.Generator().manual_seed(0)
    texts = [PROMPTS[o] + v for o in OBJECTS for v in (", front view", ", side view")]
    imgs = sample(prior, texts, 64, 7.5, 25, gen).permute(0, 2, 3, 1)  # [8, 64, 64, 3]
    hist = foreground_histogram(imgs)
    names = list(refs)
    dist = torch.stack([(hist - refs[o]).abs().sum(1) for o in names], 1)  # [8, 4] L1
    got = [names[i] for i in dist.argmin(1).tolist()]
    want = [o for o in OBJECTS for _ in range(2)]
    assert sum(g == w for g, w in zip(got, want)) >= 7, (got, dist)


def test_smooth_encoder_trains_only_the_encoder():
    """`smooth-encoder` (issue 9, colours) must leave the decoder as it was, so the prior's UNet
    stays valid, and its align term must raise cos(J_Eᵀ v, J_D v) on its own direction pool.
    A tiny random AutoencoderKL, a few steps: seconds."""
    from diffusers import AutoencoderKL

    from benchmarks.toy_prior.smooth_encoder import _cos, _math_attention, direction_pool
    from benchmarks.toy_prior.smooth_encoder import encoder_moments, smooth_encoder

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4,
                        norm_num_groups=4, layers_per_block=1, sample_size=32)
    images = (torch.rand(16, 3, 32, 32) * 255).to(torch.uint8)
    dec0 = {k: v.clone() for k, v in vae.decoder.state_dict().items()}
    # The pool smooth_encoder(seed=0) draws first from its generator: the one it trains on.
    pool = direction_pool(vae, images, 16, torch.Generator().manual_seed(0), "random")

    def mean_cos() -> float:
        x = pool["x"].clone().requires_grad_(True)
        with _math_attention():
            u, = torch.autograd.grad(encoder_moments(vae, x)[:, :4], x, pool["v"])
        return float(_cos(u, pool["d"]).mean())

    before = mean_cos()
    rec = smooth_encoder(vae, images, steps=30, batch=8, lr=2e-3, align_weight=1.0,
                         directions="random", pool=16, log=lambda row: None)
    assert all(torch.equal(dec0[k], v) for k, v in vae.decoder.state_dict().items())
    assert rec["steps"] == 30
    after = mean_cos()
    assert after > before + 0.04, (before, after)  # measured .001 → .085
