"""Stage 1: optimise 3D Gaussians against a guidance (SDS, or the quality benchmark's oracle).

DreamGaussian's text-to-3D loop: a grey ball of Gaussians, random orbit views rendered at a
growing resolution, the guidance loss backpropagated into the Gaussian parameters, and gsplat's
DefaultStrategy cloning, splitting and pruning them for part of the run.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from tdgen.config import Stage1Config
from tdgen.errors import GenerationError
from tdgen.gaussians import Gaussians, init_ball
from tdgen.progress import Progress, ProgressFn, no_progress
from tdgen.render import Backend, render_gaussians, sample_orbit_cameras

SCENE_EXTENT = 4.0
"""World extent the densifier's 3D-scale thresholds are relative to (DreamGaussian passes
extent=4 to densify_and_prune, so splats wider than 0.04 are split rather than cloned)."""

_MAX_BAD_FRACTION = 0.05  # non-finite steps tolerated before giving up ("a few percent")


@dataclass
class Stage1Result:
    gaussians: Gaussians
    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)  # one per step, NaN where skipped


def _resolution(step: int, cfg: Stage1Config) -> int:
    # DreamGaussian's 128 → 256 → 512 at 0 %, 30 % and 60 % of the run.
    frac = step / cfg.steps
    div = 4 if frac < 0.3 else 2 if frac < 0.6 else 1
    return max(8, cfg.resolution // div)


def position_lr(step: int, cfg: Stage1Config) -> float:
    """Learning rate of the centres: exponential decay from lr_position at step 0 to
    lr_position_final at `lr_position_decay` of the run, then held (3DGS's position schedule)."""
    t = min(1.0, step / max(1.0, cfg.lr_position_decay * (cfg.steps - 1)))
    return cfg.lr_position * (cfg.lr_position_final / cfg.lr_position) ** t


def _refines(strategy, step: int) -> bool:
    """Whether DefaultStrategy grows and prunes after this step (its own condition)."""
    return (strategy.refine_start_iter < step < strategy.refine_stop_iter
            and step % strategy.refine_every == 0
            and step % strategy.reset_every >= strategy.pause_refine_after_reset)


def _fraction_threshold(state: dict, fraction: float) -> float:
    """The mean screen-space gradient that `fraction` of the Gaussians seen since the last round
    exceed (DefaultStrategy's own statistic: accumulated norm / views that saw each)."""
    count = state.get("count")
    if count is None or not bool((count > 0).any()):
        return float("inf")
    seen = count > 0
    mean = state["grad2d"][seen] / count[seen]
    return float(torch.quantile(mean.float(), 1.0 - fraction))


def _backgrounds(n: int, cfg: Stage1Config, generator: torch.Generator, device) -> torch.Tensor:
    if cfg.background == "white":
        return torch.ones(n, 3, device=device)
    elif cfg.background == "black":
        return torch.zeros(n, 3, device=device)
    # White or black per view, so the splat cannot paint the background into itself.
    pick = torch.rand(n, 1, generator=generator, device=generator.device) < 0.5
    return pick.float().expand(n, 3).to(device)


def optimize_gaussians(guidance, cfg: Stage1Config, device, generator: torch.Generator,
                       on_progress: ProgressFn = no_progress,
                       backend: Backend = "auto") -> Stage1Result:
    """Run stage 1 for `cfg.steps` steps; `guidance.loss(images [B,3,H,W], cams, backgrounds [B,3],
    progress)` is the only thing the loop knows about the objective."""
    from gsplat.strategy import DefaultStrategy
    from gsplat.strategy.ops import remove, reset_opa

    t0 = time.perf_counter()
    device = torch.device(device)
    steps = cfg.steps

    # 1. initial Gaussians and their optimisers (one Adam per tensor, as gsplat strategies need)
    g0 = init_ball(cfg.num_points, cfg.init_radius, cfg.init_opacity, generator).to(device)
    params = torch.nn.ParameterDict({
        "means": g0.means, "scales": g0.scales, "quats": g0.quats,
        "opacities": g0.opacities, "sh0": g0.sh0,
    })
    lrs = {"means": cfg.lr_position, "scales": cfg.lr_scale, "quats": cfg.lr_rotation,
           "opacities": cfg.lr_opacity, "sh0": cfg.lr_color}
    # eps 1e-15 as in the 3DGS reference trainers: tiny gradients still move small splats.
    optimizers = {k: torch.optim.Adam([params[k]], lr=lrs[k], eps=1e-15) for k in params}

    # 2. densifier
    strategy = DefaultStrategy(
        prune_opa=cfg.prune_opacity,
        grow_grad2d=cfg.densify_grad,
        refine_start_iter=int(cfg.densify_start * steps),
        refine_stop_iter=int(cfg.densify_stop * steps),
        refine_every=cfg.densify_every,
        # gsplat 1.5.3's own reset never fires (`step % every == 0 & step > 0` parses as a chained
        # comparison ending in `0 > 0`), so the loop resets itself; the strategy's period still
        # arms its prune of oversized splats after the first reset, as in 3DGS.
        reset_every=cfg.opacity_reset_every or steps + 1,
    )
    strategy.check_sanity(params, optimizers)
    state = strategy.initialize_state(scene_scale=SCENE_EXTENT)

    losses: list[float] = []
    bad = 0
    max_bad = max(2, int(_MAX_BAD_FRACTION * steps))
    on_progress(Progress("stage1", 0, steps, None, f"{len(params['means'])} Gaussians"))

    # gsplat's split draws from the global RNG; seed it from our generator inside a fork so a
    # seed reproduces the run and the caller's global RNG state is left alone.
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for step in range(steps):
            # 3. views, render, loss
            optimizers["means"].param_groups[0]["lr"] = position_lr(step, cfg)
            res = _resolution(step, cfg)
            cams = sample_orbit_cameras(cfg.batch_size, cfg, res, generator).to(device)
            bgs = _backgrounds(cfg.batch_size, cfg, generator, device)  # [B, 3]
            n = len(params["means"])
            g = Gaussians(params["means"], params["scales"], params["quats"], params["opacities"],
                          params["sh0"], params["sh0"].new_zeros(n, 0, 3))
            out = render_gaussians(g, cams, bgs, backend=backend)
            strategy.step_pre_backward(params, optimizers, state, step, out.info)
            images = out.rgb.permute(0, 3, 1, 2)  # [B, 3, H, W]
            loss = guidance.loss(images, cams, bgs, progress=step / steps)
            loss.backward()

            # 4. the one host sync per step: skip non-finite steps (DefaultStrategy's torch.where
            # syncs every step anyway, so this costs no extra GPU idle time). The gradients are
            # checked too: a NaN born in the backward (renderer, VAE encoder) leaves the loss
            # value finite but would reach Adam.
            checks = [torch.isfinite(p.grad).all() for p in params.values() if p.grad is not None]
            finite = torch.stack(checks).all() if checks else torch.ones((), device=device)
            value, grads_ok = torch.stack([loss.detach().float(), finite.float()]).tolist()
            if not math.isfinite(value) or not grads_ok:
                value = float("nan")
                bad += 1
                losses.append(float("nan"))
                for opt in optimizers.values():
                    opt.zero_grad(set_to_none=True)
                if bad > max_bad:
                    raise GenerationError(
                        f"stage 1 diverged: {bad} of {step + 1} steps gave a non-finite loss; "
                        "lower stage1.guidance_scale or the stage1 learning rates (lr_*)"
                    )
                on_progress(Progress("stage1", step + 1, steps, None,
                                     f"{n} Gaussians, step skipped"))
                continue
            losses.append(value)
            for opt in optimizers.values():
                opt.step()
                opt.zero_grad(set_to_none=True)

            # 5. densify / prune, then the hard cap (drop the faintest splats)
            if cfg.densify_fraction > 0 and _refines(strategy, step):
                strategy.grow_grad2d = _fraction_threshold(state, cfg.densify_fraction)
            strategy.step_post_backward(params, optimizers, state, step, out.info, packed=False)
            every = cfg.opacity_reset_every
            if every and 0 < step < strategy.refine_stop_iter and step % every == 0:
                reset_opa(params=params, optimizers=optimizers, state=state,
                          value=2.0 * cfg.prune_opacity)
            n = len(params["means"])
            if n > cfg.max_points:
                with torch.no_grad():
                    faint = torch.argsort(params["opacities"])[: n - cfg.max_points]
                    mask = torch.zeros(n, dtype=torch.bool, device=device)
                    mask[faint] = True
                remove(params=params, optimizers=optimizers, state=state, mask=mask)
                n = cfg.max_points
            on_progress(Progress("stage1", step + 1, steps, value, f"{n} Gaussians"))

    if bad == steps:
        raise GenerationError(
            "stage 1 diverged: every step gave a non-finite loss; lower stage1.guidance_scale or "
            "the stage1 learning rates (lr_*)"
        )
    n = len(params["means"])
    result = Gaussians(
        means=params["means"].detach().clone(),
        scales=params["scales"].detach().clone(),
        quats=params["quats"].detach().clone(),
        opacities=params["opacities"].detach().clone(),
        sh0=params["sh0"].detach().clone(),
        shN=torch.zeros(n, 0, 3, device=device),
    )
    return Stage1Result(result, steps, time.perf_counter() - t0, losses)
