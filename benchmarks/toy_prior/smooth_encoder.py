"""`smooth-encoder`: fine-tune the toy VAE's encoder so its backward pass follows the decoder.

Why (issue 9, colours): stage 1's pixel gradient is J_Eᵀ g, g = w(t)(ε̂ − ε) in latent space. On
the toy VAE its cosine to the decoded target's direction D(x̂0) − x was 0.13–0.18 and it looked
like an 8-px magenta/green pattern (benchmarks/results/toy-prior-2026-12-02): the encoder's
transposed Jacobian scrambles the direction the prior asks for. Only the encoder (and its
quant_conv) is trained here; the decoder and the UNet are untouched, so the prior's latent space
stays the one the UNet was trained on. The loss:

- keep: MSE of the new encoder's moments (mean and log-variance) to the original's, on the
  training renders and on stage-1-like inputs (`splat_soup`: clouds of 2D Gaussians, renders
  blended into them, pixel noise), so the latents the UNet sees do not move;
- align: 1 − cos(J_Eᵀ v, J_D v) for latent directions v, with J_Eᵀ v taken through the sampled
  latent μ + σ·n as `SDSGuidance.encode_images` samples it (a vector-Jacobian product with
  create_graph, so its cosine can be trained), and J_D v the frozen decoder's directional
  derivative at the original latent (a central difference). v is N(0, I), or the SDS vectors
  w(t)(ε̂ − ε) of the prior itself (`directions="sds"`), or half of each.
- cycle (optional, `cycle_weight`): ‖E(D(z)) − z‖² for z the original latents of the batch.

`sds_gradient_check` is the measurement (diag_sds_gradient's logic): the cosine of the SDS pixel
gradient −J_Eᵀ g to D(x̂0) − x on the chair's renders and on a grey blob, t = 0.8 / 0.5 / 0.2.
"""

from __future__ import annotations

import copy
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

FD_STEP = 1e-2
"""Central-difference step for the decoder's J_D v, in latent units (latents have std ≈ 1)."""


@contextmanager
def _math_attention():
    """The VAE's mid-block attention through SDPA's math kernel: the fused CPU kernel has no
    double backward, which the align term needs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield


def encoder_moments(vae, x: Tensor) -> Tensor:
    """x [B, 3, H, W] in [-1, 1] → [B, 8, H/8, W/8]: mean (4) and log-variance (4), unscaled."""
    h = vae.encoder(x)
    return vae.quant_conv(h) if vae.quant_conv is not None else h


def _sample(moments: Tensor, noise: Tensor) -> Tensor:
    """μ + σ·n with diffusers' clamp of the log-variance (DiagonalGaussianDistribution)."""
    mean, logvar = moments.chunk(2, dim=1)
    return mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * noise


def splat_soup(n: int, size: int, gen: torch.Generator) -> Tensor:  # → [n, 3, S, S] in [0, 1]
    """Stage-1-like renders: 20–400 isotropic 2D Gaussians round the centre composited front to
    back over a white, black or grey background; their colours grey (the sphere init), random
    (what SDS noise paints), or grey plus noise."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size),
                            indexing="ij")
    pix = torch.stack([xx, yy], -1).reshape(-1, 2)  # [P, 2]
    out = []
    for _ in range(n):
        k = int(torch.randint(20, 401, (1,), generator=gen))
        spread = 0.15 + 0.35 * torch.rand(1, generator=gen)
        centre = torch.randn(k, 2, generator=gen) * spread
        sigma = 0.03 + 0.12 * torch.rand(k, 1, generator=gen) * (1.2 - spread)
        opacity = 0.2 + 0.75 * torch.rand(k, 1, generator=gen)
        kind = int(torch.randint(0, 3, (1,), generator=gen))
        grey = 0.3 + 0.4 * torch.rand(1, generator=gen)
        if kind == 0:
            col = grey.expand(k, 3)
        elif kind == 1:
            col = torch.rand(k, 3, generator=gen)
        else:
            col = (grey + 0.25 * torch.randn(k, 3, generator=gen)).clamp(0, 1)
        d2 = (pix[None] - centre[:, None]).pow(2).sum(-1)  # [k, P]
        alpha = (opacity * torch.exp(-0.5 * d2 / sigma.pow(2))).clamp(0, 0.99)  # [k, P]
        trans = torch.cumprod(torch.cat([torch.ones(1, alpha.shape[1]), 1 - alpha[:-1]]), 0)
        w = alpha * trans
        rgb = w.t() @ col  # [P, 3]
        bg = torch.tensor([1.0, 0.0, 0.5])[int(torch.randint(0, 3, (1,), generator=gen))]
        rgb = rgb + (1 - w.sum(0))[:, None] * bg
        out.append(rgb.reshape(size, size, 3).permute(2, 0, 1))
    return torch.stack(out).clamp(0, 1)


def training_batch(images: Tensor, n: int, gen: torch.Generator) -> Tensor:
    """Half training renders (the first n // 2), a quarter splat soups, a quarter renders blended
    into soups; pixel noise of σ ∈ [0, 0.1] on half of all. images [N, 3, H, W] uint8 →
    [n, 3, H, W] in [-1, 1]."""
    size = images.shape[-1]
    n_r, n_s = n // 2, n // 4
    n_m = n - n_r - n_s
    idx = torch.randint(0, len(images), (n_r + n_m,), generator=gen)
    renders = images[idx].float() / 255.0
    soups = splat_soup(n_s + n_m, size, gen)
    lam = torch.rand(n_m, 1, 1, 1, generator=gen)
    mixed = lam * renders[n_r:] + (1 - lam) * soups[n_s:]
    x = torch.cat([renders[:n_r], soups[:n_s], mixed])
    sig = 0.1 * torch.rand(n, 1, 1, 1, generator=gen) * (torch.rand(n, 1, 1, 1, generator=gen) < 0.5)
    x = (x + sig * torch.randn(x.shape, generator=gen)).clamp(0, 1)
    return x * 2 - 1


def decoder_jvp(vae, z: Tensor, v: Tensor, h: float = FD_STEP) -> Tensor:
    """J_D v at z (unscaled latents) by a central difference; the decoder is frozen."""
    with torch.no_grad():
        return (vae.decode(z + h * v).sample - vae.decode(z - h * v).sample) / (2 * h)


@torch.no_grad()
def sds_directions(prior, z: Tensor, gen: torch.Generator) -> Tensor:
    """w(t)(ε̂ − ε) at t ~ U[0.02, 0.98]·T for latents z (unscaled), with a random view caption of
    a random object and guidance 20 (the CI stage-1 config's): the vectors SDS pulls latents along."""
    from benchmarks.toy_prior.objects import PROMPTS
    from tdgen.guidance import VIEW_SUFFIXES, encode_texts, predict_noise_cfg

    b = len(z)
    scale = prior.vae.config.scaling_factor
    lat = z * scale
    names = list(PROMPTS)
    views = list(VIEW_SUFFIXES.values())
    texts = [PROMPTS[names[int(i)]] + views[int(j)] for i, j in
             zip(torch.randint(0, len(names), (b,), generator=gen),
                 torch.randint(0, len(views), (b,), generator=gen))]
    cond = encode_texts(prior, texts)
    uncond = encode_texts(prior, [""]).expand(b, -1, -1)
    t = torch.randint(20, 981, (b,), generator=gen)
    noise = torch.randn(lat.shape, generator=gen)
    noisy = prior.scheduler.add_noise(lat, noise, t)
    eps = predict_noise_cfg(prior, noisy, t, cond, uncond, 20.0, use_graphs=False)
    w = 1 - prior.alphas_cumprod[t].view(-1, 1, 1, 1)
    return w * (eps - noise) * scale  # d(loss)/d(unscaled z) = scale · g


def _cos(a: Tensor, b: Tensor) -> Tensor:  # per sample
    return F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1, eps=1e-12)


@torch.no_grad()
def direction_pool(teacher, images: Tensor, n: int, gen: torch.Generator, directions: str,
                   prior=None, chunk: int = 64) -> dict:
    """`n` training inputs with the original encoder's moments, a latent direction v each and the
    frozen decoder's J_D v: computed once, since the teacher and the decoder never change (the two
    decodes per sample cost more than the encoder's double backward)."""
    xs, moms, vs, ds, rs = [], [], [], [], []
    for start in range(0, n, chunk):
        b = min(chunk, n - start)
        x = training_batch(images, b, gen)
        rs.append(torch.arange(b) < b // 2)
        mom = encoder_moments(teacher, x)
        z0 = mom[:, :4]
        v = torch.randn(z0.shape, generator=gen)
        if directions in ("sds", "mix"):
            g = sds_directions(prior, z0, gen)
            g = g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
            g = g * float(np.sqrt(v[0].numel()))  # the norm of an N(0, I) direction
            v = g if directions == "sds" else torch.where(
                (torch.arange(b) % 2 == 1).view(-1, 1, 1, 1), g, v)
        xs.append(x)
        moms.append(mom)
        vs.append(v)
        ds.append(decoder_jvp(teacher, z0, v))
    cat = torch.cat
    return {"x": cat(xs), "moments": cat(moms), "v": cat(vs), "d": cat(ds), "render": cat(rs)}


def smooth_encoder(vae, images: Tensor, steps: int = 600, batch: int = 16, lr: float = 5e-4,
                   align_weight: float = 0.1, cycle_weight: float = 0.0,
                   directions: str = "mix", prior=None, seed: int = 0, pool: int = 2048,
                   keep_off_weight: float = 1.0, lowpass_weight: float = 0.0,
                   log=print) -> dict:
    """Fine-tune `vae.encoder` and `vae.quant_conv` in place (fp32, CPU). images [N, 3, H, W]
    uint8. Returns the training record."""
    gen = torch.Generator().manual_seed(seed)
    teacher = copy.deepcopy(vae).eval().requires_grad_(False)
    t0 = time.perf_counter()
    data = direction_pool(teacher, images, pool, gen, directions, prior)
    pool_seconds = round(time.perf_counter() - t0, 1)
    vae.requires_grad_(False)
    params = list(vae.encoder.parameters())
    if vae.quant_conv is not None:
        params += list(vae.quant_conv.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    hist = []
    with _math_attention():
        for step in range(steps):
            for g in opt.param_groups:  # linear warm-up over 50 steps, then cosine to 10 %
                warm = min(1.0, (step + 1) / 50)
                g["lr"] = lr * warm * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * step / steps)))
            idx = torch.randint(0, pool, (batch,), generator=gen)
            x = data["x"][idx].clone().requires_grad_(align_weight > 0)
            tgt = data["moments"][idx]
            mom = encoder_moments(vae, x)
            # The UNet was trained on the renders' latents: keep those; off the data (soups, noise)
            # the latents may give way to the alignment by `keep_off_weight`.
            kw = torch.where(data["render"][idx], 1.0, keep_off_weight).view(-1, 1, 1, 1)
            keep = (kw * (mom - tgt).pow(2)).mean()
            loss = keep
            terms = {"keep": float(keep.detach())}
            if align_weight > 0:
                n = torch.randn(tgt[:, :4].shape, generator=gen)
                u, = torch.autograd.grad(_sample(mom, n), x, data["v"][idx], create_graph=True)
                cos = _cos(u, data["d"][idx])
                loss = loss + align_weight * (1 - cos).mean()
                terms["cos"] = float(cos.detach().mean())
                if lowpass_weight > 0:
                    # The same cosine at the latent cell's scale (8×8 means): the flat colour
                    # of a region, which the full-resolution cosine weighs little next to edges.
                    cos_lp = _cos(F.avg_pool2d(u, 8), F.avg_pool2d(data["d"][idx], 8))
                    loss = loss + lowpass_weight * (1 - cos_lp).mean()
                    terms["cos_lowpass"] = float(cos_lp.detach().mean())
            if cycle_weight > 0:
                with torch.no_grad():
                    z = _sample(tgt, torch.randn(tgt[:, :4].shape, generator=gen))
                    xd = teacher.decode(z).sample.clamp(-1, 1)
                cyc = F.mse_loss(encoder_moments(vae, xd)[:, :4], z)
                loss = loss + cycle_weight * cyc
                terms["cycle"] = float(cyc.detach())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % 50 == 0 or step == steps - 1:
                row = {"step": step, **{k: round(v_, 5) for k, v_ in terms.items()},
                       "seconds": round(time.perf_counter() - t0, 1)}
                hist.append(row)
                log(row)
    vae.requires_grad_(False).eval()
    return {"steps": steps, "batch": batch, "lr": lr, "align_weight": align_weight,
            "cycle_weight": cycle_weight, "directions": directions, "seed": seed, "pool": pool,
            "keep_off_weight": keep_off_weight, "lowpass_weight": lowpass_weight,
            "pool_seconds": pool_seconds, "seconds": round(time.perf_counter() - t0, 1),
            "history": hist}


@torch.no_grad()
def reconstruction_psnr(vae, images: Tensor, n: int = 256) -> float:
    """PSNR (dB, images in [-1, 1], peak-to-peak 2) of decode(posterior mean), as `train` reports."""
    x = images[:n].float() / 127.5 - 1
    rec = vae.decode(vae.encode(x).latent_dist.mean).sample.float()
    return float(10 * torch.log10(4.0 / F.mse_loss(rec, x)))


def _encode(model, x: Tensor, noise: Tensor | None) -> Tensor:
    """Scaled latents of x [B, 3, H, W] in [0, 1]: the posterior mean, or μ + σ·noise (as SDS
    samples it), or the tiny encoder's latents when the model has one."""
    tiny = model.tiny_vae
    if tiny is not None:
        return tiny.encode(x * 2 - 1).latents * tiny.config.scaling_factor
    vae = model.vae
    mom = encoder_moments(vae, x * 2 - 1)
    z = mom[:, :4] if noise is None else _sample(mom, noise)
    return z * vae.config.scaling_factor


def sds_gradient_check(model, obj: str = "chair", guidance: float = 7.5, reps: int = 8,
                       seed: int = 0, sheet: Path | None = None) -> dict:
    """Cosine of the SDS pixel gradient −J_Eᵀ g to the decoded target direction D(x̂0) − x, per
    input (the object's renders at azimuth 0/90/180/−90 on white, and a grey blob) and t.

    Both latent paths are measured: `mean` (the posterior mean, as the 2026-12-02 diagnostic did)
    and `sample` (μ + σ·n, what `SDSGuidance.encode_images` backpropagates through). Each number
    is the mean over the 4 views of the cosine of gradients averaged over `reps` noise draws."""
    from benchmarks.toy_prior.data import render_views
    from benchmarks.toy_prior.evaluate import stage1_config
    from benchmarks.toy_prior.objects import PROMPTS, build_object
    from tdgen.guidance import encode_prompt, predict_noise_cfg, view_embeddings

    gen = torch.Generator().manual_seed(seed)
    cfg = stage1_config(guidance_scale=guidance)
    emb = encode_prompt(model, PROMPTS[obj], "", True)
    az = torch.tensor([0.0, 90.0, 180.0, -90.0])
    x_ref = render_views(build_object(obj), torch.zeros(4), az, torch.ones(4, 3), 64,
                         cfg).permute(0, 3, 1, 2)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 64), torch.linspace(-1, 1, 64), indexing="ij")
    blob = ((xx ** 2 + yy ** 2) < 0.15).float()
    x_blob = (1 - blob * 0.5)[None, None].expand(4, 3, 64, 64).clone()
    scale = model.vae.config.scaling_factor
    out, rows = {}, []
    cond = view_embeddings(emb, az)
    unc = emb.uncond.expand(4, -1, -1)
    with _math_attention():
        for name, x0 in ((obj, x_ref), ("blob", x_blob)):
            for frac in (0.8, 0.5, 0.2):
                t = torch.full((4,), int(frac * 1000))
                acc = {"mean": torch.zeros_like(x0), "sample": torch.zeros_like(x0)}
                dec_acc = torch.zeros_like(x0)
                for _ in range(reps):
                    n_lat = torch.randn((4, 4, 8, 8), generator=gen)
                    n_post = torch.randn((4, 4, 8, 8), generator=gen)
                    for path in (("mean", "sample") if model.tiny_vae is None else ("mean",)):
                        x = x0.clone().requires_grad_(True)
                        lat = _encode(model, x, None if path == "mean" else n_post)
                        noisy = model.scheduler.add_noise(lat.detach(), n_lat, t)
                        eps = predict_noise_cfg(model, noisy, t, cond, unc, guidance,
                                                use_graphs=False)
                        ab = model.alphas_cumprod[t].view(-1, 1, 1, 1)
                        g = (1 - ab) * (eps - n_lat)
                        gx, = torch.autograd.grad(lat, x, g)
                        acc[path] += gx / reps
                        if path == "mean":
                            with torch.no_grad():
                                x0_hat = (noisy - (1 - ab).sqrt() * eps) / ab.sqrt()
                                dec = (model.vae.decode(x0_hat / scale).sample + 1) / 2
                                dec_acc += dec.clamp(0, 1) / reps
                d = dec_acc - x0
                key = f"{name}_t{frac}"
                out[key] = {p: round(float(_cos(-acc[p], d).mean()), 3)
                            for p in acc if acc[p].abs().sum() > 0}
                # Share of the energy in colour (what is left after each pixel's grey level is
                # taken out), of the gradient and of the target direction.
                for nm, vec in (("chroma_grad", -acc["mean"]), ("chroma_target", d)):
                    c = vec - vec.mean(1, keepdim=True)
                    out[key][nm] = round(float(c.pow(2).sum() / vec.pow(2).sum().clamp_min(1e-20)), 3)
                blur = F.avg_pool2d(acc["mean"], 5, 1, 2)
                out[key]["hf_energy"] = round(float((acc["mean"] - blur).pow(2).sum()
                                                    / acc["mean"].pow(2).sum().clamp_min(1e-20)), 3)
                gm = -acc["mean"]
                gvis = gm / (gm.abs().amax((1, 2, 3), keepdim=True) + 1e-12) * 0.5 + 0.5
                rows.append(torch.cat([torch.cat(list(x0), 2), torch.cat(list(dec_acc), 2),
                                       torch.cat(list(gvis), 2)], 1))
    cells = list(out.values())
    for path in ("mean", "sample"):
        vals = [c[path] for c in cells if path in c]
        if vals:
            out[f"average_{path}"] = round(float(np.mean(vals)), 3)
    if sheet is not None:
        from PIL import Image

        img = torch.cat(rows, 1).permute(1, 2, 0).detach().clamp(0, 1).numpy()
        Image.fromarray((img * 255 + 0.5).astype(np.uint8)).save(sheet)
    return out


def write_smoothed_prior(src: Path, data: Path, out: Path, **kw) -> dict:
    """Copy the prior folder `src` to `out` (or work in place), fine-tune its VAE encoder on the
    renders in `data` (`smooth_encoder`'s keywords), save the VAE in fp16 as `train` does (the
    decoder's fp16 weights come back bit for bit) and record the run in toy_prior.json."""
    import json
    import shutil

    from diffusers import AutoencoderKL

    from benchmarks.toy_prior.data import ToyData
    from benchmarks.toy_prior.evaluate import load_prior
    from tdgen.guidance import quiet_hf_progress

    src, out = Path(src), Path(out)
    if src.resolve() != out.resolve():
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(src, out)
    torch.manual_seed(kw.get("seed", 0))
    images = torch.from_numpy(ToyData.load(data).images).permute(0, 3, 1, 2).contiguous()
    prior = load_prior(src, "cpu") if kw.get("directions", "mix") != "random" else None
    vae = AutoencoderKL.from_pretrained(str(src / "vae")).float()
    before = reconstruction_psnr(vae, images)
    rec = smooth_encoder(vae, images, prior=prior, **kw)
    after = reconstruction_psnr(vae, images)
    with quiet_hf_progress():
        vae.to(torch.float16).save_pretrained(out / "vae", safe_serialization=True)
    rec.update(psnr_db_before=round(before, 2), psnr_db_after=round(after, 2),
               data=str(data), source=str(src))
    info_path = out / "toy_prior.json"
    info = json.loads(info_path.read_text())
    info["encoder_finetune"] = {k: v for k, v in rec.items() if k != "history"}
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    return rec


TINY_CONFIG = dict(encoder_block_out_channels=(32, 32, 32, 32), num_encoder_blocks=(1, 2, 2, 2),
                   decoder_block_out_channels=(8, 8, 8, 8), num_decoder_blocks=(1, 1, 1, 1),
                   latent_channels=4, scaling_factor=1.0)
"""A toy AutoencoderTiny: TAESD's layout (three stride-2 stages, factor 8) at 32 channels. Its
decoder is a placeholder: tdgen uses only the encoder (`model.sds_encoder=tiny`)."""


def distil_tiny(vae, images: Tensor, steps: int = 500, batch: int = 16, lr: float = 1e-3,
                align_weight: float = 0.2, directions: str = "mix", prior=None, seed: int = 0,
                pool: int = 2048, log=print):
    """A fresh AutoencoderTiny whose encoder predicts `vae`'s scaled posterior mean (TAESD
    predicts SD's scaled latents, scaling_factor 1), on fresh training batches, plus the same
    align term as `smooth_encoder` on a direction pool. Returns (module, record)."""
    from diffusers import AutoencoderTiny

    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tiny = AutoencoderTiny(**TINY_CONFIG)
    vae = vae.eval().requires_grad_(False)
    scale = float(vae.config.scaling_factor)
    t0 = time.perf_counter()
    data = direction_pool(vae, images, pool, gen, directions, prior) if align_weight > 0 else None
    opt = torch.optim.Adam(tiny.encoder.parameters(), lr=lr)
    tiny.decoder.requires_grad_(False)
    hist = []
    for step in range(steps):
        for g in opt.param_groups:
            warm = min(1.0, (step + 1) / 50)
            g["lr"] = lr * warm * (0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * step / steps)))
        x = training_batch(images, batch, gen)
        with torch.no_grad():
            tgt = encoder_moments(vae, x)[:, :4] * scale
        fit = F.mse_loss(tiny.encode(x).latents, tgt)
        loss = fit
        terms = {"fit": float(fit.detach())}
        if data is not None:
            idx = torch.randint(0, pool, (batch,), generator=gen)
            xp = data["x"][idx].clone().requires_grad_(True)
            lat = tiny.encode(xp).latents
            fit_p = F.mse_loss(lat, data["moments"][idx][:, :4] * scale)
            u, = torch.autograd.grad(lat, xp, data["v"][idx], create_graph=True)
            cos = _cos(u, data["d"][idx])
            loss = loss + fit_p + align_weight * (1 - cos).mean()
            terms["cos"] = float(cos.detach().mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            row = {"step": step, **{k: round(v_, 5) for k, v_ in terms.items()},
                   "seconds": round(time.perf_counter() - t0, 1)}
            hist.append(row)
            log(row)
    tiny.eval().requires_grad_(False)
    return tiny, {"steps": steps, "batch": batch, "lr": lr, "align_weight": align_weight,
                  "directions": directions, "seed": seed, "pool": pool, "config": TINY_CONFIG,
                  "seconds": round(time.perf_counter() - t0, 1), "history": hist}


def write_tiny_encoder(prior_dir: Path, data: Path, out: Path, **kw) -> dict:
    """Distil a toy AutoencoderTiny from the prior's VAE encoder into `out` (config.json and
    diffusion_pytorch_model.safetensors: the folder `model.tiny_encoder_id` takes)."""
    import json

    from benchmarks.toy_prior.data import ToyData
    from benchmarks.toy_prior.evaluate import load_prior
    from tdgen.guidance import quiet_hf_progress

    torch.manual_seed(kw.get("seed", 0))
    images = torch.from_numpy(ToyData.load(data).images).permute(0, 3, 1, 2).contiguous()
    prior = load_prior(prior_dir, "cpu")
    tiny, rec = distil_tiny(prior.vae, images, prior=prior, **kw)
    with torch.no_grad():
        x = images[:256].float() / 127.5 - 1
        ref = prior.vae.encode(x).latent_dist.mean * prior.vae.config.scaling_factor
        err = F.mse_loss(tiny.encode(x).latents, ref) / ref.var()
    rec.update(latent_rel_mse=round(float(err), 4), prior=str(prior_dir), data=str(data))
    out = Path(out)
    with quiet_hf_progress():
        tiny.save_pretrained(out, safe_serialization=True)
    (out / "distil_record.json").write_text(json.dumps(rec, indent=1) + "\n")
    return rec
