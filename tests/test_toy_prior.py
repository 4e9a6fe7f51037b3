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

# Measured on the 2-core dev box (IoU vs the mug / vs the mug turned 180°): normal .821 / .616,
# flipped sign .281 / .300, swapped view prompts .592 / .804; the three runs take ~90 s.
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
    print(losses)  # measured: right .0159, empty .0216, another object's .0624
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
