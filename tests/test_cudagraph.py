"""CUDA-graph replay of the VAE encoder and decoder: same outputs and gradients as the plain
calls, one graph per shape and grad mode, a failed capture falls back with a warning."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tdgen.config import ModelConfig
from tdgen.cudagraph import graph_key
from tdgen.guidance import load_model


def test_graph_key_tells_grad_mode_shape_and_layout_apart():
    x = torch.zeros(1, 3, 8, 8)
    key = graph_key("encoder", x)
    assert key == graph_key("encoder", x.clone())
    with torch.no_grad():
        assert graph_key("encoder", x) != key
    assert graph_key("encoder", x.clone().requires_grad_(True)) != key
    assert graph_key("encoder", x) != graph_key("encoder", torch.zeros(1, 3, 16, 16))
    assert graph_key("encoder", x) != graph_key("encoder", x.contiguous(memory_format=torch.channels_last))
    assert graph_key("encoder", x) != graph_key("decoder", x)


def test_vae_graphs_are_a_cuda_choice_only(tiny_model_dir):
    m = load_model(ModelConfig(id=str(tiny_model_dir), vae_graphs=True), torch.device("cpu"))
    assert not m.vae_graphs
    z = torch.randn(1, 4, 8, 8)
    torch.testing.assert_close(m.decode(z), m.vae.decode(z).sample)
    assert not m.graphs


def _graphed_and_plain(tiny_model_dir):
    m = load_model(ModelConfig(id=str(tiny_model_dir), vae_graphs=True), torch.device("cuda"))
    assert m.vae_graphs
    return m, dataclasses.replace(m, vae_graphs=False)


@pytest.mark.gpu
def test_graphed_vae_matches_the_plain_calls(tiny_model_dir):
    m, plain = _graphed_and_plain(tiny_model_dir)
    gen = torch.Generator("cuda").manual_seed(0)
    for _ in range(3):  # capture, then replays with fresh inputs
        x = (torch.rand(1, 3, 64, 64, device="cuda", generator=gen) * 2 - 1).half()
        z = torch.randn(1, 4, 8, 8, device="cuda", generator=gen).half()
        with torch.no_grad():  # image-space SDS: the encoder's forward only
            torch.testing.assert_close(m.latent_dist(x).mean, plain.latent_dist(x).mean,
                                       rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(m.decode(z), plain.decode(z), rtol=2e-2, atol=2e-2)
        # latent-space SDS: forward and backward through the encoder
        g = torch.randn(1, 4, 8, 8, device="cuda", generator=gen)
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        (ga,) = torch.autograd.grad((m.latent_dist(xa).mean.float() * g).sum(), xa)
        (gb,) = torch.autograd.grad((plain.latent_dist(xb).mean.float() * g).sum(), xb)
        torch.testing.assert_close(ga, gb, rtol=2e-2, atol=2e-2)
    captured = [k[0] for k, v in m.graphs.items() if v]
    assert sorted(captured) == ["decoder", "encoder", "encoder"], captured  # no-grad, grad, decoder


@pytest.mark.gpu
def test_a_failed_capture_warns_and_runs_plain(tiny_model_dir, monkeypatch):
    import tdgen.cudagraph as cg

    m, plain = _graphed_and_plain(tiny_model_dir)
    monkeypatch.setattr(cg.torch.cuda, "CUDAGraph", lambda: (_ for _ in ()).throw(RuntimeError("no")))
    z = torch.randn(1, 4, 8, 8, device="cuda").half()
    with pytest.warns(RuntimeWarning, match="CUDA graph capture of the VAE decoder failed"):
        out = m.decode(z)
    torch.testing.assert_close(out, plain.decode(z), rtol=2e-2, atol=2e-2)
    assert list(m.graphs.values()) == [False]
    m.decode(z)  # warned once per shape: no second capture attempt
