"""CUDA-graph replay of the diffusion model's fixed-shape calls (UNet CFG forward, VAE encoder and
decoder): at batch 1 SDS is launch-bound, and a replayed graph costs one launch instead of
hundreds. PyTorch's own `torch.cuda.graph` / `make_graphed_callables` do the capturing; this
module only adds static input buffers, the warm-up that must not be captured, and a per-shape
cache that falls back to eager calls (with one warning) where capture fails.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch import Tensor


class GraphedForward:
    """`fn(*args)` without grad, captured once for the shapes of `args` and replayed with new
    values: `fn` must take and return tensors only, its output a single tensor."""

    def __init__(self, fn: Callable[..., Tensor], args: tuple[Tensor, ...], pool=None):
        self.inputs = tuple(a.clone() for a in args)
        # Warm-up on a side stream: cuDNN/cuBLAS autotuning, inductor's first call and lazy
        # inits must not be captured.
        dev = args[0].device
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(3):
                fn(*self.inputs)
        torch.cuda.current_stream(dev).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(self.graph, pool=pool):
            self.out = fn(*self.inputs)

    def __call__(self, *args: Tensor) -> Tensor:
        for dst, src in zip(self.inputs, args):
            dst.copy_(src)
        self.graph.replay()
        # Clone: the next replay overwrites `out`.
        return self.out.clone()


def graphed_call(cache: dict, key, fn: Callable[..., Tensor], args: tuple[Tensor, ...],
                 label: str, pool=None) -> Tensor | None:
    """`fn(*args)` replayed from the graph cached under `key` (captured on first use), or None
    when capture failed for this key (the caller runs `fn` eagerly; warned once per key).

    With grad enabled and an input that requires it, the graph covers the backward too
    (`torch.cuda.make_graphed_callables`): the VAE encoder of latent-space SDS."""
    runner = cache.get(key)
    if runner is None:
        try:
            if torch.is_grad_enabled() and any(a.requires_grad for a in args):
                sample = tuple(a.detach().clone().requires_grad_(a.requires_grad) for a in args)
                runner = torch.cuda.make_graphed_callables(fn, sample)
            else:
                runner = GraphedForward(fn, args, pool)
        except Exception as e:  # capture fails on some driver/op/compiler combinations
            warnings.warn(f"CUDA graph capture of the {label} failed ({e!r:.300}); running it "
                          "eagerly", RuntimeWarning, stacklevel=3)
            runner = False
        cache[key] = runner
    return runner(*args) if runner else None


def graph_key(part: str, *args: Tensor) -> tuple:
    """Cache key of one graphed call: the part, grad mode, and each input's shape, dtype and
    memory layout (a graph replays one layout)."""
    return (part, torch.is_grad_enabled(),
            *((tuple(a.shape), a.dtype, a.stride(), a.requires_grad) for a in args))
