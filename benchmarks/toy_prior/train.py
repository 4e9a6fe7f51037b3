"""`train`: the VAE as an autoencoder, then the UNet with SD's schedule and ε-objective.

The prompt gap is measured while training, because it is the known trap (issue 9): on a fixed
held-out batch with fixed noise, per noise band, the ε-MSE with the true caption, the empty
caption, another object's caption (same view) and another view's caption (same object). A UNet
that uses the prompt has cond < wrong < empty at mid and high t; one that ignores it has them
equal.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.toy_prior.data import VIEWS, ToyData
from benchmarks.toy_prior.model import WORDS, Components, PriorSize, build_components, save_model
from benchmarks.toy_prior.objects import PROMPTS
from tdgen.guidance import VIEW_SUFFIXES
from tdgen.testing.tiny_model import SD_SCHEDULER_CONFIG

BANDS = ((0, 250), (250, 500), (500, 750), (750, 1000))
"""Timestep bands the prompt gap is reported in."""
T_WEIGHT_CAP = 0.0
"""Default cap of the per-timestep weight of the ε-MSE (`timestep_weights`)."""
DROPOUT = 0.1
"""Fraction of captions replaced by the empty prompt (classifier-free guidance, Ho & Salimans)."""
KL_WEIGHT = 1e-6
"""KL weight of the autoencoder (the LDM KL-f8 VAE's)."""


def _log(msg: str) -> None:
    import sys

    print(f"[toy-prior] {msg}", file=sys.stderr, flush=True)


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    import contextlib

    return contextlib.nullcontext()


def _lr(step: int, steps: int, base: float, warmup: int = 100) -> float:
    """Linear warm-up, then cosine to 10 % of `base`."""
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, steps - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def train_vae(vae, images: torch.Tensor, steps: int, batch: int, lr: float,
              gen: torch.Generator, max_seconds: float, stop: int | None = None) -> dict:
    """images [N, 3, H, W] uint8 on the training device. Returns facts for the record."""
    device = images.device
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0, fused=device.type == "cuda")
    vae.train()
    t0 = time.perf_counter()
    hist = []
    done = 0
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, lr)
        idx = torch.randint(0, len(images), (batch,), generator=gen, device=gen.device).to(device)
        x = images[idx].float() / 127.5 - 1.0
        with _autocast(device):
            post = vae.encode(x).latent_dist
            rec = vae.decode(post.sample(generator=gen)).sample
        rec = rec.float()
        rec_loss = F.mse_loss(rec, x) + 0.5 * (rec - x).abs().mean()
        loss = rec_loss + KL_WEIGHT * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        done = step + 1
        if step % 200 == 0 or step == steps - 1:
            hist.append({"step": step, "rec": float(rec_loss.detach())})
            _log(f"vae {step}/{steps} rec {float(rec_loss.detach()):.4f}")
        if time.perf_counter() - t0 > max_seconds or (stop is not None and done >= stop):
            _log(f"vae: stopped at step {done} of a {steps}-step schedule")
            break
    vae.eval()
    return {"steps": done, "seconds": round(time.perf_counter() - t0, 1), "history": hist}


@torch.no_grad()
def encode_dataset(vae, images: torch.Tensor, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std [N, 4, h, w] of every image (fp32)."""
    means, stds = [], []
    for i in range(0, len(images), chunk):
        x = images[i:i + chunk].float() / 127.5 - 1.0
        d = vae.encode(x).latent_dist
        means.append(d.mean.float())
        stds.append(d.std.float())
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def encode_captions(c: Components, texts: list[str], device) -> torch.Tensor:  # [K, L, D]
    tok = c.tokenizer(texts, padding="max_length", max_length=c.tokenizer.model_max_length,
                      truncation=True, return_tensors="pt")
    return c.text_encoder.to(device)(tok.input_ids.to(device))[0].float()


class CaptionTable:
    """Every caption the prior can be asked for, index 0 the empty prompt."""

    def __init__(self, objects: list[str]):
        self.objects = objects
        self.texts = [""] + [PROMPTS[o] + VIEW_SUFFIXES[v] for o in objects for v in VIEWS]

    def index(self, obj: np.ndarray, view: np.ndarray) -> np.ndarray:
        return 1 + obj * len(VIEWS) + view


def _gap_eval_set(data: ToyData, mean, std, table: CaptionTable, n: int, seed: int, device):
    """A fixed batch per band: latents, noise, t, and the four caption ids per sample."""
    g = torch.Generator().manual_seed(seed + 99)
    idx = torch.randperm(len(data.obj), generator=g)[:n]
    obj, view = data.obj[idx.numpy()], data.view[idx.numpy()]
    k = len(data.objects)
    wrong_obj = (obj + 1 + torch.randint(0, max(1, k - 1), (n,), generator=g).numpy()) % k
    wrong_view = np.where(view == 0, 2, np.where(view == 2, 0, 0))  # front↔back, side→front
    ids = {
        "cond": table.index(obj, view), "empty": np.zeros(n, dtype=np.int64),
        "wrong_object": table.index(wrong_obj, view), "wrong_view": table.index(obj, wrong_view),
    }
    z = mean[idx.to(mean.device)] + std[idx.to(mean.device)] * torch.randn(
        mean[:n].shape, generator=g).to(mean.device)
    sets = []
    for lo, hi in BANDS:
        t = torch.randint(lo, hi, (n,), generator=g)
        noise = torch.randn(z.shape, generator=g)
        sets.append((t.to(device), noise.to(device)))
    return z.to(device), sets, {k2: torch.from_numpy(v).long().to(device) for k2, v in ids.items()}


@torch.no_grad()
def prompt_gap(unet, sched, z0: torch.Tensor, sets, ids: dict, emb: torch.Tensor) -> list[dict]:
    """ε-MSE per band and caption kind (see the module docstring)."""
    out = []
    for (lo, hi), (t, noise) in zip(BANDS, sets):
        zt = sched.add_noise(z0, noise, t)
        row = {"band": f"{lo}-{hi}"}
        for kind, cid in ids.items():
            with _autocast(z0.device):
                pred = unet(zt, t, encoder_hidden_states=emb[cid]).sample
            row[kind] = float(F.mse_loss(pred.float(), noise))
        row["gap_empty"] = row["empty"] - row["cond"]
        out.append(row)
    return out


def timestep_weights(alphas_cumprod: torch.Tensor, cap: float) -> torch.Tensor:  # [T] → [T]
    """Weight of the ε-MSE per timestep: min(1/ᾱ_t, cap), scaled to mean 1 over uniform t.

    The model still predicts ε on SD's schedule (what tdgen's SDS and img2img expect); only the
    balance over t moves. 1/ᾱ_t is the v-objective's weight written on ε. Why: with the plain
    ε-MSE a better guess of the object changes the loss at high t (where a sample's identity
    and layout are decided) by only ~ᾱ_t, so a short run learns the prompt at low t alone and
    its samples ignore it (measured: 5.1k steps drew a chair for "a boot"). cap 0 = uniform."""
    if cap <= 0:
        return torch.ones_like(alphas_cumprod)
    w = (1.0 / alphas_cumprod).clamp_max(cap)
    return w / w.mean()


def train_unet(unet, mean, std, scale: float, caption_ids: torch.Tensor, emb: torch.Tensor,
               steps: int, batch: int, lr: float, ema_decay: float, gen: torch.Generator,
               gap_fn, gap_every: int, max_seconds: float, stop: int | None = None,
               t_weight_cap: float = T_WEIGHT_CAP):
    """ε-prediction on z0 = scale·(μ + σ·n), t ~ U{0..999}, captions dropped to "" at DROPOUT.

    mean/std [N, 4, h, w], caption_ids [N] into emb [K, L, D] (row 0 = empty). Returns
    (EMA UNet, facts)."""
    from diffusers import DDPMScheduler

    device = mean.device
    sched = DDPMScheduler(**{k: v for k, v in SD_SCHEDULER_CONFIG.items()
                             if k not in ("skip_prk_steps", "set_alpha_to_one", "steps_offset")})
    sched.alphas_cumprod = sched.alphas_cumprod.to(device)
    t_weight = timestep_weights(sched.alphas_cumprod.float(), t_weight_cap)  # [1000]
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    # Fused Adam and a foreach EMA: the small UNet is launch-bound, and a per-tensor Python loop
    # over ~300 tensors cost more than the convolutions on the H200.
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.01,
                            fused=device.type == "cuda")
    ema_p, net_p = list(ema.parameters()), list(unet.parameters())
    unet.train()
    t0 = time.perf_counter()
    hist, gaps = [], []
    done = 0
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, lr, warmup=200)
        idx = torch.randint(0, len(mean), (batch,), generator=gen, device=gen.device).to(device)
        z0 = scale * (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen,
                                                         device=gen.device).to(device))
        noise = torch.randn(z0.shape, generator=gen, device=gen.device).to(device)
        t = torch.randint(0, 1000, (batch,), generator=gen, device=gen.device).to(device)
        drop = torch.rand(batch, generator=gen, device=gen.device).to(device) < DROPOUT
        cid = torch.where(drop, 0, caption_ids[idx])
        zt = sched.add_noise(z0, noise, t)
        with _autocast(device):
            pred = unet(zt, t, encoder_hidden_states=emb[cid]).sample
        loss = (t_weight[t] * (pred.float() - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        # A short EMA with warm-up (decay (1+s)/(10+s) early): a few thousand steps are too few
        # for SD's 0.9999 to forget the random initialisation.
        d = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_p, net_p, 1 - d)
        done = step + 1
        if step % 100 == 0:
            hist.append({"step": step, "loss": float(loss.detach())})
        last = (step == steps - 1 or time.perf_counter() - t0 > max_seconds
                or (stop is not None and done >= stop))
        if step % gap_every == 0 or last:
            g = gap_fn(ema)
            gaps.append({"step": step, "bands": g})
            _log(f"unet {step}/{steps} loss {float(loss.detach()):.4f} gap(empty−cond) "
                 + " ".join(f"{r['band']}:{r['gap_empty']:+.4f}" for r in g)
                 + " wrong-view " + " ".join(f"{r['wrong_view'] - r['cond']:+.4f}" for r in g))
        if last:
            if step < steps - 1:
                _log(f"unet: stopped at step {done} of a {steps}-step schedule")
            break
    return ema, {"t_weight_cap": t_weight_cap, "steps": done,
                 "seconds": round(time.perf_counter() - t0, 1), "history": hist,
                 "prompt_gap": gaps}


def train_prior(data: ToyData, size: PriorSize, out: Path, device, seed: int = 0,
                vae_steps: int = 2000, unet_steps: int = 4000, batch: int = 128,
                vae_batch: int = 32, lr: float = 5e-4, ema_decay: float = 0.995,
                max_seconds: float = 600.0, unet_stop: int | None = None,
                vae_stop: int | None = None, t_weight_cap: float = T_WEIGHT_CAP) -> dict:
    """Train every component, save the diffusers folder to `out`, return the record.

    `vae_stop` / `unet_stop` end training after that many steps of the `vae_steps` / `unet_steps`
    schedules: what a `max_seconds` cap did in the run being reproduced (its record's steps)."""
    device = torch.device(device)
    t_start = time.perf_counter()
    torch.manual_seed(seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    out.mkdir(parents=True, exist_ok=True)
    c = build_components(size, list(data.objects) + list(WORDS), seed, out)
    gen = torch.Generator(device=device).manual_seed(seed)
    images = torch.from_numpy(data.images).permute(0, 3, 1, 2).contiguous().to(device)

    # 1. autoencoder
    vae = c.vae.to(device)
    vae_rec = train_vae(vae, images, vae_steps, vae_batch, 1e-3,
                        gen, max_seconds=0.35 * max_seconds, stop=vae_stop)
    mean, std = encode_dataset(vae, images)
    # SD's scaling factor is 1/std of the latents (0.18215 for KL-f8); measured the same way.
    scale = float(1.0 / mean.std())
    vae.register_to_config(scaling_factor=scale)
    with torch.no_grad():
        x = images[:256].float() / 127.5 - 1
        rec = vae.decode(mean[:256]).sample.float()
        vae_psnr = float(10 * torch.log10(4.0 / F.mse_loss(rec, x)))
    _log(f"vae: scaling_factor {scale:.4f}, reconstruction PSNR {vae_psnr:.2f} dB")

    # 2. captions and the prompt-gap probe
    table = CaptionTable(list(data.objects))
    emb = encode_captions(c, table.texts, device)  # [K, L, D]
    caption_ids = torch.from_numpy(table.index(data.obj, data.view)).long().to(device)
    from diffusers import DDPMScheduler

    probe_sched = DDPMScheduler(**{k: v for k, v in SD_SCHEDULER_CONFIG.items()
                                   if k not in ("skip_prk_steps", "set_alpha_to_one",
                                                "steps_offset")})
    probe_sched.alphas_cumprod = probe_sched.alphas_cumprod.to(device)
    z_eval, sets, ids = _gap_eval_set(data, mean, std, table, min(256, len(data.obj)), seed,
                                      device)
    z_eval = z_eval * scale

    def gap_fn(unet_eval):
        return prompt_gap(unet_eval, probe_sched, z_eval, sets, ids, emb)

    # 3. UNet
    unet = c.unet.to(device)
    left = max(30.0, max_seconds - (time.perf_counter() - t_start))
    ema, unet_rec = train_unet(unet, mean, std, scale, caption_ids, emb, unet_steps, batch, lr,
                               ema_decay, gen, gap_fn, gap_every=max(50, unet_steps // 10),
                               max_seconds=left, stop=unet_stop, t_weight_cap=t_weight_cap)
    c.unet = ema
    c.vae = vae

    record = {
        "size": asdict(size), "seed": seed, "device": str(device),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
        "images": int(len(data.obj)), "objects": list(data.objects), "captions": table.texts,
        "vae": {**vae_rec, "scaling_factor": scale, "psnr_db": round(vae_psnr, 2)},
        "unet": unet_rec, "batch": batch, "lr": lr, "ema_decay": ema_decay,
        "dropout": DROPOUT, "t_weight_cap": t_weight_cap, "seconds": round(time.perf_counter() - t_start, 1),
        "unet_params_m": round(sum(p.numel() for p in ema.parameters()) / 1e6, 2),
    }
    # fp16 on disk halves the size (the committed CPU prior); tdgen loads it in any dtype.
    c.text_encoder.to("cpu")
    for m in (c.vae, c.unet):
        m.to("cpu", torch.float16)
    save_model(c, out, {k: v for k, v in record.items() if k not in ("unet", "vae")}
               | {"vae_psnr_db": round(vae_psnr, 2), "unet_steps": unet_rec["steps"],
                  "unet_schedule_steps": unet_steps, "vae_steps": vae_rec["steps"],
                  "vae_schedule_steps": vae_steps, "unet_seconds": unet_rec["seconds"],
                  "vae_seconds": vae_rec["seconds"]})
    for m in (c.vae, c.unet):
        m.float()
    _log(f"saved {out} in {record['seconds']} s")
    return record
