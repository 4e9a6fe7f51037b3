"""The diffusion side: prompt embeddings, score distillation and img2img targets.

One `DiffusionModel` (loaded by `tdgen.model.load_model`, re-exported here) is loaded per process
(or batch worker) and shared by stage 1 (SDS through `SDSGuidance`) and texture refinement
(`img2img_target`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from tdgen.config import Stage1Config
from tdgen.cudagraph import graph_key, graphed_call
# Model finding/checking/loading lives in tdgen.model; these names stay importable from here.
from tdgen.model import (  # noqa: F401
    CHANNELS_LAST_UNET,
    COMPONENTS,
    PICKLE_SUFFIXES,
    WEIGHT_COMPONENTS,
    DiffusionModel,
    assemble_model,
    folder_fingerprint,
    load_model,
    load_tiny_encoder,
    quiet_hf_progress,
    resolve_dtype,
)

if TYPE_CHECKING:
    from tdgen.render import Cameras

VIEW_SUFFIXES = {"front": ", front view", "side": ", side view", "back": ", back view"}


# ---------------------------------------------------------------------------------------------
# Prompts


@dataclass
class PromptEmbeddings:
    uncond: Tensor
    """[1, L, D] embedding of the negative (or empty) prompt."""
    views: dict[str, Tensor]
    """{"front"|"side"|"back"} or {"none"} → [1, L, D]."""


@torch.no_grad()
def encode_texts(model: DiffusionModel, texts: list[str]) -> Tensor:  # [N, L, D]
    tok = model.tokenizer(texts, padding="max_length", max_length=model.tokenizer.model_max_length,
                          truncation=True, return_tensors="pt")
    ids = tok.input_ids.to(model.device)
    # SD conditions on the last hidden state (SD 2.x's text tower is already cut to 23 layers).
    return model.text_encoder(ids)[0].to(model.dtype)


def encode_prompt(model: DiffusionModel, prompt: str, negative: str = "",
                  view_prompts: bool = True) -> PromptEmbeddings:
    """Encode the prompt once: the unconditional embedding and one per view suffix."""
    names = list(VIEW_SUFFIXES) if view_prompts else ["none"]
    texts = [negative] + [prompt + VIEW_SUFFIXES.get(n, "") for n in names]
    emb = encode_texts(model, texts)
    views = {n: emb[i + 1:i + 2] for i, n in enumerate(names)}
    return PromptEmbeddings(uncond=emb[:1], views=views)


def wrap_azimuth(azimuth_deg: float) -> float:
    """Azimuth in (-180, 180]."""
    a = float(azimuth_deg) % 360.0
    return a - 360.0 if a > 180.0 else a


def view_name(azimuth_deg: float) -> str:
    """front for |az| ≤ 45°, back for |az| ≥ 135°, side otherwise (threestudio's split)."""
    a = abs(wrap_azimuth(azimuth_deg))
    if a <= 45.0:
        return "front"
    if a >= 135.0:
        return "back"
    return "side"


def view_index(azimuth: Tensor) -> Tensor:  # [B] degrees → [B] long: 0 front, 1 side, 2 back
    """`view_name` on a tensor, on its device (no host sync in the training loop)."""
    a = (torch.remainder(azimuth.float() + 180.0, 360.0) - 180.0).abs()
    return (a > 45.0).long() + (a >= 135.0).long()


def view_embeddings(emb: PromptEmbeddings, azimuth: Tensor) -> Tensor:  # [B] deg → [B, L, D]
    """The per-view conditional embedding for each camera."""
    if "none" in emb.views:
        return emb.views["none"].expand(len(azimuth), -1, -1)
    stacked = torch.cat([emb.views[n] for n in VIEW_SUFFIXES])  # [3, L, D] front, side, back
    return stacked[view_index(azimuth).to(stacked.device)]


# ---------------------------------------------------------------------------------------------
# The UNet with classifier-free guidance, eager or replayed from a CUDA graph


@torch.no_grad()
def predict_noise_cfg(model: DiffusionModel, noisy: Tensor, t: Tensor, cond: Tensor,
                      uncond: Tensor, guidance_scale: float, use_graphs: bool | None = None
                      ) -> Tensor:
    """ε̂ = ε_u + s(ε_c − ε_u) from one UNet call on the doubled batch [uncond; cond].

    noisy [B, 4, h, w] (any float dtype), t [B] long, cond/uncond [B, L, D] → ε̂ [B, 4, h, w] fp32.
    v-prediction models are converted to ε so callers see one parameterisation.
    """
    b = noisy.shape[0]
    x_in = torch.cat([noisy, noisy]).to(model.dtype)
    t_in = torch.cat([t, t])
    emb = torch.cat([uncond, cond]).to(model.dtype)
    if model.device.type == "cuda" and CHANNELS_LAST_UNET:
        x_in = x_in.contiguous(memory_format=torch.channels_last)
    graphs = model.cuda_graphs if use_graphs is None else use_graphs
    out = None
    if graphs and model.device.type == "cuda":
        out = graphed_call(model.graphs, graph_key("unet", x_in, t_in, emb), model.unet_forward,
                           (x_in, t_in, emb), "UNet")
    if out is None:
        out = model.unet_forward(x_in, t_in, emb)
    out = out.float()
    pred_u, pred_c = out[:b], out[b:]
    pred = pred_u + guidance_scale * (pred_c - pred_u)
    if model.prediction_type == "v_prediction":
        # ε = √ᾱ·v + √(1−ᾱ)·x_t (Salimans & Ho 2022); linear in v, so converting after CFG
        # equals converting both branches.
        ac = model.alphas_cumprod[t].view(-1, 1, 1, 1)
        pred = ac.sqrt() * pred + (1 - ac).sqrt() * noisy.float()
    return pred


# ---------------------------------------------------------------------------------------------
# Score distillation


class Guidance(Protocol):
    """What stage 1 optimises against: SDS, or a test oracle."""

    def loss(self, images: Tensor, cams: Cameras, backgrounds: Tensor, progress: float) -> Tensor:
        """images [B, 3, H, W] in [0, 1] (differentiable), backgrounds [B, 3], progress in
        [0, 1] → scalar loss."""
        ...


class _SDSSurrogate(torch.autograd.Function):
    """½‖z − sg(z − g)‖² / B with its gradient set to exactly g / B.

    Written out because autograd through z − (z − g) rounds in fp32 and returns g only to a few
    ulps; the value is ½‖g‖²/B, the usual SDS loss readout (threestudio).
    """

    @staticmethod
    def forward(ctx, latents: Tensor, grad: Tensor) -> Tensor:
        b = latents.shape[0]
        ctx.save_for_backward(grad)
        ctx.b = b
        return 0.5 * grad.pow(2).sum() / b

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (grad,) = ctx.saved_tensors
        return grad_out * grad / ctx.b, None


def timestep_bounds(cfg: Stage1Config, num_train_timesteps: int) -> tuple[int, int]:
    """(min_step, max_step) as integer timesteps (DreamGaussian: 0.02·T and 0.98·T)."""
    lo = int(round(cfg.t_min * num_train_timesteps))
    hi = min(int(round(cfg.t_max * num_train_timesteps)), num_train_timesteps - 1)
    return max(lo, 0), max(hi, lo)


def sample_timesteps(cfg: Stage1Config, num_train_timesteps: int, progress: float, batch: int,
                     generator: torch.Generator, device) -> Tensor:  # [B] long
    """`anneal`: t = t_max − (t_max − t_min)·progress (DreamGaussian's linear anneal);
    `random`: uniform in [t_min, max(t_min, that same decaying maximum)]."""
    p = min(max(float(progress), 0.0), 1.0)
    lo, hi = timestep_bounds(cfg, num_train_timesteps)
    frac = cfg.t_max - (cfg.t_max - cfg.t_min) * p
    top = min(max(int(round(frac * num_train_timesteps)), lo), hi)
    if cfg.t_schedule == "anneal":
        return torch.full((batch,), top, dtype=torch.long, device=device)
    return torch.randint(lo, top + 1, (batch,), generator=generator, device=generator.device,
                         dtype=torch.long).to(device)


@torch.no_grad()
def decode_latents(model: DiffusionModel, latents: Tensor) -> Tensor:
    """Scaled latents [B, 4, h, w] → images [B, 3, 8h, 8w] in [0, 1] fp32, without grad.

    Always the model's full VAE decoder: a tiny SDS encoder predicts the same scaled latents
    (TAESD is distilled to), and load_model keeps the full VAE beside it."""
    out = model.decode((latents / model.vae.config.scaling_factor).to(model.dtype))
    return ((out.float() + 1) / 2).clamp(0.0, 1.0)


class SDSGuidance:
    """Score distillation sampling (DreamFusion) with DreamGaussian's timestep anneal."""

    def __init__(self, model: DiffusionModel, prompt: str | PromptEmbeddings, cfg: Stage1Config,
                 generator: torch.Generator):
        self.model = model
        self.cfg = cfg
        self.generator = generator
        self.embeddings = (prompt if isinstance(prompt, PromptEmbeddings)
                           else encode_prompt(model, prompt, cfg.negative_prompt, cfg.view_prompts))
        self.last_t: Tensor | None = None  # [B] long
        self.last_w: Tensor | None = None  # [B] fp32
        self.last_target: Tensor | None = None  # [B, 3, R, R] in [0, 1]; sds_space = "image"
        self._nonfinite = torch.zeros((), dtype=torch.long, device=model.device)
        if cfg.sds_space == "image" and getattr(model, "vae", None) is None:
            raise ValueError("stage1.sds_space=image decodes its target with the model's VAE "
                             "decoder, and this model has no VAE; load the full model or use "
                             "stage1.sds_space=latent")

    @property
    def nan_count(self) -> int:
        """Steps whose SDS gradient had NaN/inf entries (zeroed). Reading it syncs the device."""
        return int(self._nonfinite.item())

    def encode_images(self, images: Tensor) -> Tensor:
        """images [B, 3, H, W] in [0, 1] → scaled latents [B, 4, H/8, W/8] fp32, differentiable."""
        images = self._resize(images)
        # Clamp first (DreamGaussian does): gsplat clamps colours only at 0, and a VAE trained on
        # [-1, 1] images is asked nothing sensible by the > 1 values additive splats reach.
        x = (images.clamp(0.0, 1.0) * 2 - 1).to(self.model.dtype)
        tiny = self.model.tiny_vae
        if tiny is not None:
            # TAESD predicts SD's already-scaled latents; its scaling_factor is 1.0 by default.
            latents = tiny.encode(x).latents * tiny.config.scaling_factor
        else:
            dist = self.model.latent_dist(x)
            latents = dist.sample(generator=self.generator) * self.model.vae.config.scaling_factor
        return latents.float()

    def _resize(self, images: Tensor) -> Tensor:  # [B, 3, H, W] → [B, 3, R, R], R the encode size
        res = self.cfg.encode_resolution
        if res and tuple(images.shape[-2:]) != (res, res):
            images = F.interpolate(images, (res, res), mode="bilinear", align_corners=False)
        return images

    def loss(self, images: Tensor, cams: Cameras, backgrounds: Tensor, progress: float) -> Tensor:
        """images [B, 3, H, W] in [0, 1] with grad; cams.azimuth [B] picks the view prompts;
        backgrounds [B, 3] (unused by SDS) → scalar. `sds_space = "image"` runs latent SDS up to
        `sds_image_start` of the run, then image-space SDS."""
        if self.cfg.sds_space == "image" and progress >= self.cfg.sds_image_start:
            return self.image_loss(images, cams.azimuth, progress)
        latents = self.encode_images(images)
        return self.latent_loss(latents, cams.azimuth, progress)

    @torch.no_grad()
    def _predict(self, latents: Tensor, azimuth: Tensor, progress: float, guidance: float):
        """Draw t and ε, noise the latents [B, 4, h, w] and run the CFG UNet.

        Random draws, in order: t (random schedule only), then ε ~ N(0, I) of the latents' shape.
        → (t [B] long, ε, z_t, ε̂ [B, 4, h, w] fp32, w [B] fp32)."""
        model = self.model
        b = latents.shape[0]
        t = sample_timesteps(self.cfg, model.num_train_timesteps, progress, b, self.generator,
                             model.device)
        noise = torch.randn(latents.shape, generator=self.generator, device=self.generator.device,
                            dtype=torch.float32).to(latents.device)
        cond = view_embeddings(self.embeddings, azimuth)
        uncond = self.embeddings.uncond.expand(b, -1, -1)
        noisy = model.scheduler.add_noise(latents, noise, t)
        eps_hat = predict_noise_cfg(model, noisy, t, cond, uncond, guidance)
        # w(t) = 1 − ᾱ_t (DreamFusion's choice, as in DreamGaussian).
        w = 1.0 - model.alphas_cumprod[t]
        self.last_t, self.last_w = t, w
        return t, noise, noisy, eps_hat, w

    def _guard(self, grad: Tensor, *inputs: Tensor) -> tuple[Tensor, Tensor]:
        """A NaN from an fp16 overflow (or non-finite renders, latents or decoded targets) must
        not poison every Gaussian: count it without a sync and zero the gradient; the returned
        flag makes the loss value NaN so stage 1's guard skips the step instead of stepping Adam
        on zeros."""
        bad = (~torch.isfinite(grad)).any()
        for x in inputs:
            bad = bad | (~torch.isfinite(x)).any()
        self._nonfinite += bad.long()
        return torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0), bad

    def latent_loss(self, latents: Tensor, azimuth: Tensor, progress: float) -> Tensor:
        """SDS on latents [B, 4, h, w] fp32 with grad; azimuth [B] degrees → scalar.

        Random draws, in order: t (random schedule only), then ε ~ N(0, I) of the latents' shape.
        """
        with torch.no_grad():
            _, noise, _, eps_hat, w = self._predict(latents.detach(), azimuth, progress,
                                                    self.cfg.guidance_scale)
            grad, bad = self._guard(w.view(-1, 1, 1, 1) * (eps_hat - noise), latents.detach())
        loss = _SDSSurrogate.apply(latents, grad)
        return torch.where(bad, torch.full_like(loss, float("nan")), loss)

    def image_loss(self, images: Tensor, azimuth: Tensor, progress: float) -> Tensor:
        """Image-space SDS (`sds_space = "image"`): images [B, 3, H, W] with grad; azimuth [B]
        degrees → scalar whose gradient w.r.t. the images resized to `encode_resolution` is
        exactly w(t)·(x − D(x̂0)) / B.

        Random draws as the latent path's, in order: the posterior sample (VAE encoder), t
        (random schedule only), ε, so a seed gives the same t and ε in both spaces.
        """
        model = self.model
        x = self._resize(images)  # [B, 3, R, R], not clamped
        with torch.no_grad():
            # Encoder forward only: the gradient comes from the decoded target, not from J_Eᵀ.
            latents = self.encode_images(x)
            t, _, noisy, eps_hat, w = self._predict(latents, azimuth, progress,
                                                     self.cfg.sds_image_guidance)
            ac = model.alphas_cumprod[t].view(-1, 1, 1, 1)
            x0 = (noisy - (1 - ac).sqrt() * eps_hat) / ac.sqrt()  # [B, 4, h, w]
            target = decode_latents(model, x0)  # [B, 3, 8h, 8w] in [0, 1]
            if target.shape[-2:] != x.shape[-2:]:  # encode_resolution 0 at a size not /8
                target = F.interpolate(target, x.shape[-2:], mode="bilinear", align_corners=False)
            # The residual is taken on the unclamped render, not on the clamp the encoder saw:
            # through clamp(0, 1) a pixel above 1 (additive splats reach ~2) gets no gradient
            # at all, while the target is a colour in [0, 1] that such a pixel should move to.
            # Scale: the plain gradient of w·½‖x − sg(D(x̂0))‖² summed over [0, 1] pixels, as
            # the latent path sums over latents. Adam (per-parameter) and densify_fraction (a
            # quantile) do not see a global factor; densify_grad (densify_fraction = 0) and the
            # loss readout do.
            grad, bad = self._guard(w.view(-1, 1, 1, 1) * (x.detach() - target), eps_hat)
        self.last_target = target
        # Readout ½‖g‖²/B, the latent path's convention (there g is w(ε̂ − ε)).
        loss = _SDSSurrogate.apply(x, grad)
        return torch.where(bad, torch.full_like(loss, float("nan")), loss)


# ---------------------------------------------------------------------------------------------
# img2img targets for texture refinement


@torch.no_grad()
def img2img_target(model: DiffusionModel, images: Tensor, cond: Tensor, uncond: Tensor,
                   strength: float, ddim_steps: int, guidance_scale: float,
                   generator: torch.Generator) -> Tensor:
    """SDEdit (Meng et al. 2022) as DreamGaussian's refinement uses it: `strength` is the fraction
    of a `ddim_steps` DDIM schedule that is *skipped*; the encoded images are noised to the
    timestep at index int(ddim_steps·strength) and denoised with CFG over the remaining steps, so
    0.8 of 50 noises to t≈180/1000 and runs 10 UNet calls, 0.95 runs 3 (a gentler touch as the
    texture settles).

    images [B, 3, H, W] in [0, 1]; cond/uncond [B, L, D] → [B, 3, H, W] in [0, 1] fp32.
    """
    from diffusers import DDIMScheduler

    b = images.shape[0]
    # A private scheduler: set_timesteps mutates it, and the shared one serves SDS. It steps as an
    # ε model because predict_noise_cfg already converts v-predictions to ε; it never clips x0
    # (latents are not bounded to [-1, 1]; see model.load_model).
    sched = DDIMScheduler.from_config(model.scheduler.config, prediction_type="epsilon",
                                      clip_sample=False)
    sched.set_timesteps(ddim_steps, device=model.device)
    n_skip = min(max(int(ddim_steps * float(strength)), 0), ddim_steps)
    timesteps = sched.timesteps[n_skip:]
    if len(timesteps) == 0:
        return images.detach().float().clamp(0, 1)

    vae = model.vae
    x = (images.detach() * 2 - 1).to(model.device, model.dtype)
    latents = vae.encode(x).latent_dist.sample(generator=generator).float()
    latents = latents * vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=generator, device=generator.device,
                        dtype=torch.float32).to(latents.device)
    latents = sched.add_noise(latents, noise, timesteps[:1].repeat(b))

    uncond = uncond.expand(b, -1, -1)
    for t in timesteps:
        tb = t.reshape(1).repeat(b).to(model.device)
        # Same latent shape every call of a refinement run, so the captured UNet graph (shared with
        # SDS when the sizes match) removes the launch gaps here too.
        eps = predict_noise_cfg(model, latents, tb, cond, uncond, guidance_scale)
        latents = sched.step(eps, t, latents).prev_sample
    return decode_latents(model, latents)
