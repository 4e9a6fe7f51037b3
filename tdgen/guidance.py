"""The diffusion side: model loading, prompt embeddings, score distillation and img2img targets.

One `DiffusionModel` is loaded per process (or batch worker) and shared by stage 1 (SDS through
`SDSGuidance`) and texture refinement (`img2img_target`). Only safetensors weights are loaded.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from tdgen.config import ModelConfig, Stage1Config
from tdgen.errors import ModelFormatError, ModelNotFoundError
from tdgen.io import sha256_file

# Memory layouts measured on an H200 (benchmarks/gpu_probe.py --vae): the SD VAE encoder's
# forward+backward at 512² takes 23.6 ms in NCHW and 30.6 ms in channels_last (fp16 and bf16
# alike), so the VAE stays NCHW; the UNet keeps channels_last.
CHANNELS_LAST_UNET = True

if TYPE_CHECKING:
    from tdgen.render import Cameras

COMPONENTS = ("tokenizer", "text_encoder", "vae", "unet", "scheduler")
WEIGHT_COMPONENTS = ("text_encoder", "vae", "unet")
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
VIEW_SUFFIXES = {"front": ", front view", "side": ", side view", "back": ", back view"}


# ---------------------------------------------------------------------------------------------
# The model


@dataclass
class DiffusionModel:
    """A loaded Stable Diffusion model; SDS and texture refinement share it."""

    tokenizer: Any
    text_encoder: Any
    vae: Any
    unet: Any
    scheduler: Any
    """DDIMScheduler built from the model's own scheduler config (SD ships PNDM's)."""
    device: torch.device
    dtype: torch.dtype
    model_id: str
    source: dict
    """{"id", "revision": resolved commit} for hub ids; {"id", "files": {relpath: sha256}} for
    local folders."""
    tiny_vae: Any = None
    """AutoencoderTiny used as the SDS encoder when `ModelConfig.sds_encoder = "tiny"`."""
    cuda_graphs: bool = False
    """Replay the UNet's CFG forward from CUDA graphs (set only when on CUDA and enabled)."""
    graphs: dict = field(default_factory=dict, init=False, repr=False)
    """Captured CUDA graphs per input shape; shared by every SDSGuidance on this model."""

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    @property
    def prediction_type(self) -> str:
        return str(self.scheduler.config.prediction_type)

    @property
    def alphas_cumprod(self) -> Tensor:  # [T] fp32 on the model's device
        ac = self.scheduler.alphas_cumprod
        if ac.device != self.device or ac.dtype != torch.float32:
            # Cached on the scheduler so a CUDA step never pays a host-to-device copy.
            self.scheduler.alphas_cumprod = ac = ac.to(self.device, torch.float32)
        return ac


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is fp16 on CUDA (SD's usual inference dtype) and fp32 on CPU (fp16 CPU kernels are
    slow or missing)."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]


def assemble_model(tokenizer, text_encoder, vae, unet, scheduler, device, dtype: torch.dtype,
                   model_id: str, source: dict, tiny_vae=None, cuda_graphs: bool = True
                   ) -> DiffusionModel:
    """Move frozen modules to `device`/`dtype` in eval mode and wrap them as a DiffusionModel."""
    device = torch.device(device)
    modules = [m for m in (text_encoder, vae, unet, tiny_vae) if m is not None]
    for m in modules:
        if next(m.parameters()).dtype != dtype:
            m.to(dtype=dtype)
        m.to(device=device)
        m.eval()
        m.requires_grad_(False)
    if device.type == "cuda" and CHANNELS_LAST_UNET:
        unet.to(memory_format=torch.channels_last)
    model = DiffusionModel(tokenizer, text_encoder, vae, unet, scheduler, device, dtype, model_id,
                           source, tiny_vae=tiny_vae,
                           cuda_graphs=bool(cuda_graphs and device.type == "cuda"))
    _ = model.alphas_cumprod  # move the schedule once
    return model


# ---------------------------------------------------------------------------------------------
# Locating a model: hub id or local folder


def _hub_patterns() -> list[str]:
    # Only what the five components need: configs, the tokenizer, and unsharded or sharded
    # safetensors weights (never the fp16 variant duplicates or pickles).
    patterns = ["model_index.json", "scheduler/*.json", "tokenizer/*"]
    for comp in WEIGHT_COMPONENTS:
        patterns += [f"{comp}/*.json", f"{comp}/model.safetensors",
                     f"{comp}/diffusion_pytorch_model.safetensors", f"{comp}/*-of-*.safetensors"]
    return patterns


_TINY_PATTERNS = ["config.json", "diffusion_pytorch_model.safetensors"]


def _is_offline() -> bool:
    from huggingface_hub.constants import is_offline_mode

    return bool(is_offline_mode())


def _looks_like_path(model_id: str) -> bool:
    return (model_id.startswith((".", "~", "/")) or "\\" in model_id or model_id.count("/") > 1
            or os.path.isabs(model_id))


def _fetch_hub(repo_id: str, revision: str, patterns: list[str]) -> Path:
    """Snapshot folder of a hub repo (from the cache when offline); ModelNotFoundError otherwise."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HFValidationError, HfHubHTTPError,
                                        LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    fix = (f"run 'hf download {repo_id}' on a connected machine (HF_HOME to choose the cache) "
           "or pass --model PATH to a local diffusers folder")
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except HFValidationError:
        raise ModelNotFoundError(
            f"model {repo_id!r} is neither an existing folder nor a valid hub id; pass --model "
            "PATH to a local diffusers folder or an id like owner/name") from None
    except LocalEntryNotFoundError:
        why = "offline" if _is_offline() else "network error"
        raise ModelNotFoundError(
            f"model {repo_id!r} is not in the local Hugging Face cache and could not be downloaded "
            f"({why}); {fix}") from None
    except GatedRepoError:
        raise ModelNotFoundError(
            f"model {repo_id!r} is gated on the hub; accept its licence on huggingface.co and "
            f"log in with 'hf auth login', or pass --model PATH to a local diffusers folder"
        ) from None
    except RevisionNotFoundError:
        raise ModelNotFoundError(
            f"model {repo_id!r} has no revision {revision!r}; set model.revision to an existing "
            "branch, tag or commit") from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(
            f"model {repo_id!r} was not found on the hub; check the id or pass --model PATH to a "
            "local diffusers folder") from None
    except (HfHubHTTPError, OSError) as e:
        raise ModelNotFoundError(
            f"model {repo_id!r} could not be downloaded ({type(e).__name__}); {fix}") from None


def _weight_files(folder: Path) -> tuple[list[Path], list[Path]]:
    files = [p for p in folder.rglob("*") if p.is_file()]
    safe = [p for p in files if p.name.endswith(".safetensors")]
    pickled = [p for p in files if p.name.endswith(PICKLE_SUFFIXES)]
    return safe, pickled


def _check_folder(folder: Path, model_id: str) -> None:
    """Raise the user-facing error for a folder that is not a loadable safetensors SD model."""
    safe, pickled = _weight_files(folder)
    if pickled and not safe:
        raise ModelFormatError(
            f"refusing pickled weights in {model_id!r} ({pickled[0].name}): tdgen loads only "
            "safetensors; convert to safetensors with diffusers (DiffusionPipeline.from_pretrained"
            "(DIR).save_pretrained(OUT, safe_serialization=True)) and pass --model OUT")
    for comp in COMPONENTS:
        if not (folder / comp).is_dir():
            raise ModelNotFoundError(
                f"model {model_id!r} has no {comp}/ subfolder; pass --model PATH to a complete "
                "diffusers Stable Diffusion folder (tokenizer, text_encoder, vae, unet, scheduler)")
    for comp in WEIGHT_COMPONENTS:
        if not any(p.name.endswith(".safetensors") for p in (folder / comp).iterdir()):
            if any(p.name.endswith(PICKLE_SUFFIXES) for p in (folder / comp).iterdir()):
                raise ModelFormatError(
                    f"refusing pickled weights in {model_id!r}/{comp}: tdgen loads only "
                    "safetensors; convert to safetensors with diffusers' save_pretrained("
                    "OUT, safe_serialization=True) and pass --model OUT")
            raise ModelNotFoundError(
                f"model {model_id!r} has no safetensors weights in {comp}/ (tdgen refuses pickled "
                f".bin/.ckpt weights); run 'hf download {model_id}' for a complete copy, or "
                "convert the model to safetensors and pass --model PATH")


_HASH_CACHE: dict[tuple[str, int, int], str] = {}


def _hash_cached(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASH_CACHE:
        # Hashing GBs of weights takes seconds; a batch loads the same folder many times.
        _HASH_CACHE[key] = sha256_file(path)
    return _HASH_CACHE[key]


def folder_fingerprint(folder: str | Path) -> dict[str, str]:
    """{relpath: sha256} of the weights and configs under `folder` (cached per path/size/mtime)."""
    folder = Path(folder)
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.suffix in (".safetensors", ".json", ".txt"):
            out[p.relative_to(folder).as_posix()] = _hash_cached(p)
    return out


def _locate(model_id: str, revision: str, patterns: list[str]) -> tuple[Path, dict]:
    local = Path(model_id).expanduser()
    if local.is_dir():
        return local, {"id": model_id, "files": folder_fingerprint(local)}
    if local.exists() or _looks_like_path(model_id):
        hint = ("pass a diffusers folder, not a single checkpoint file" if local.is_file()
                else "check the path")
        raise ModelNotFoundError(f"model folder {model_id!r} does not exist or is not a folder; "
                                 f"{hint} (--model PATH)")
    folder = _fetch_hub(model_id, revision, patterns)
    commit = folder.name if re.fullmatch(r"[0-9a-f]{40}", folder.name) else revision
    return folder, {"id": model_id, "revision": commit}


def _pretrained_kwargs() -> dict:
    kw: dict[str, Any] = {"use_safetensors": True}
    if importlib.util.find_spec("accelerate") is None:
        # Without accelerate diffusers warns on every load; the plain path is what it does anyway.
        kw["low_cpu_mem_usage"] = False
    return kw


@contextlib.contextmanager
def quiet_hf_progress():
    """Silence transformers'/diffusers' tqdm bars (they would interleave with our own progress
    output on stderr), restoring their previous state afterwards."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    saved = [(m, m.is_progress_bar_enabled()) for m in (tlog, dlog)]
    for m, _ in saved:
        m.disable_progress_bar()
    try:
        yield
    finally:
        for m, was in saved:
            if was:
                m.enable_progress_bar()


def load_model(cfg: ModelConfig, device) -> DiffusionModel:
    """Load a diffusers SD model from a hub id (cache first) or a local folder, frozen, in eval.

    Raises ModelNotFoundError (not cached/found, incomplete folder) or ModelFormatError (pickles).
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    device = torch.device(device)
    dtype = resolve_dtype(cfg.dtype, device)
    folder, source = _locate(cfg.id, cfg.revision, _hub_patterns())
    _check_folder(folder, cfg.id)

    kw = _pretrained_kwargs()
    with quiet_hf_progress():
        tokenizer = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))
        text_encoder = CLIPTextModel.from_pretrained(str(folder / "text_encoder"), dtype=dtype,
                                                     use_safetensors=True)
        vae = AutoencoderKL.from_pretrained(str(folder / "vae"), torch_dtype=dtype, **kw)
        unet = UNet2DConditionModel.from_pretrained(str(folder / "unet"), torch_dtype=dtype, **kw)
    # DDIM from the model's own config: SD ships a PNDM config with the same betas, and SDS only
    # needs the training schedule (ᾱ_t) plus a deterministic sampler for img2img.
    scheduler = DDIMScheduler.from_pretrained(str(folder), subfolder="scheduler")
    if scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
        raise ModelFormatError(
            f"model {cfg.id!r} predicts {scheduler.config.prediction_type!r}; tdgen supports "
            "epsilon and v_prediction models, pass --model with one of those")

    tiny_vae = None
    if cfg.sds_encoder == "tiny":
        tiny_vae, tiny_source = load_tiny_encoder(cfg.tiny_encoder_id, cfg.revision, dtype)
        source = {**source, "sds_encoder": tiny_source}
    return assemble_model(tokenizer, text_encoder, vae, unet, scheduler, device, dtype, cfg.id,
                          source, tiny_vae=tiny_vae, cuda_graphs=cfg.cuda_graphs)


def load_tiny_encoder(model_id: str, revision: str, dtype: torch.dtype):
    """AutoencoderTiny (TAESD-style) from a hub id or folder; returns (module on CPU, source)."""
    from diffusers import AutoencoderTiny

    # The tiny encoder's hub revision is its own; the SD model's revision does not apply.
    folder, source = _locate(model_id, "main", _TINY_PATTERNS)
    safe, pickled = _weight_files(folder)
    if pickled and not safe:
        raise ModelFormatError(
            f"refusing pickled weights in {model_id!r}: tdgen loads only safetensors; convert "
            "with diffusers' save_pretrained(OUT, safe_serialization=True) and set "
            "model.tiny_encoder_id to OUT")
    if not (folder / "config.json").is_file() or not safe:
        raise ModelNotFoundError(
            f"tiny encoder {model_id!r} has no config.json or safetensors weights; set "
            "model.tiny_encoder_id to an AutoencoderTiny folder or use model.sds_encoder=vae")
    with quiet_hf_progress():
        module = AutoencoderTiny.from_pretrained(str(folder), torch_dtype=dtype,
                                                 **_pretrained_kwargs())
    return module, source


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


def _unet_eps(model: DiffusionModel, latents: Tensor, t: Tensor, emb: Tensor) -> Tensor:
    """Raw UNet forward on [2B, 4, h, w] model-dtype latents, [2B] timesteps, [2B, L, D]."""
    return model.unet(latents, t, encoder_hidden_states=emb, return_dict=False)[0]


class _GraphedUNet:
    """One CUDA graph of the UNet forward for a fixed input shape (static input buffers)."""

    def __init__(self, model: DiffusionModel, latents: Tensor, t: Tensor, emb: Tensor):
        self.x = latents.clone()
        self.t = t.clone()
        self.emb = emb.clone()
        # Warm-up on a side stream (cuDNN/cuBLAS autotuning and lazy inits must not be captured).
        side = torch.cuda.Stream(device=latents.device)
        side.wait_stream(torch.cuda.current_stream(latents.device))
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(3):
                _unet_eps(model, self.x, self.t, self.emb)
        torch.cuda.current_stream(latents.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(self.graph):
            self.out = _unet_eps(model, self.x, self.t, self.emb)

    def __call__(self, latents: Tensor, t: Tensor, emb: Tensor) -> Tensor:
        self.x.copy_(latents)
        self.t.copy_(t)
        self.emb.copy_(emb)
        self.graph.replay()
        # Clone: the next replay overwrites `out`.
        return self.out.clone()


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
        key = (tuple(x_in.shape), tuple(emb.shape), x_in.dtype, t_in.dtype)
        runner = model.graphs.get(key)
        if runner is None:
            try:
                runner = _GraphedUNet(model, x_in, t_in, emb)
            except Exception as e:  # capture fails on some driver/op combinations
                warnings.warn(f"CUDA graph capture of the UNet failed ({e}); running eagerly",
                              RuntimeWarning, stacklevel=2)
                runner = False
            model.graphs[key] = runner
        if runner:
            out = runner(x_in, t_in, emb)
    if out is None:
        out = _unet_eps(model, x_in, t_in, emb)
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
        self._nonfinite = torch.zeros((), dtype=torch.long, device=model.device)

    @property
    def nan_count(self) -> int:
        """Steps whose SDS gradient had NaN/inf entries (zeroed). Reading it syncs the device."""
        return int(self._nonfinite.item())

    def encode_images(self, images: Tensor) -> Tensor:
        """images [B, 3, H, W] in [0, 1] → scaled latents [B, 4, H/8, W/8] fp32, differentiable."""
        res = self.cfg.encode_resolution
        if res and tuple(images.shape[-2:]) != (res, res):
            images = F.interpolate(images, (res, res), mode="bilinear", align_corners=False)
        # Clamp first (DreamGaussian does): gsplat clamps colours only at 0, and a VAE trained on
        # [-1, 1] images is asked nothing sensible by the > 1 values additive splats reach.
        x = (images.clamp(0.0, 1.0) * 2 - 1).to(self.model.dtype)
        tiny = self.model.tiny_vae
        if tiny is not None:
            # TAESD predicts SD's already-scaled latents; its scaling_factor is 1.0 by default.
            latents = tiny.encode(x).latents * tiny.config.scaling_factor
        else:
            vae = self.model.vae
            dist = vae.encode(x).latent_dist
            latents = dist.sample(generator=self.generator) * vae.config.scaling_factor
        return latents.float()

    def loss(self, images: Tensor, cams: Cameras, backgrounds: Tensor, progress: float) -> Tensor:
        """images [B, 3, H, W] in [0, 1] with grad; cams.azimuth [B] picks the view prompts;
        backgrounds [B, 3] (unused by SDS) → scalar."""
        latents = self.encode_images(images)
        return self.latent_loss(latents, cams.azimuth, progress)

    def latent_loss(self, latents: Tensor, azimuth: Tensor, progress: float) -> Tensor:
        """SDS on latents [B, 4, h, w] fp32 with grad; azimuth [B] degrees → scalar.

        Random draws, in order: t (random schedule only), then ε ~ N(0, I) of the latents' shape.
        """
        model = self.model
        b = latents.shape[0]
        t = sample_timesteps(self.cfg, model.num_train_timesteps, progress, b, self.generator,
                             model.device)
        noise = torch.randn(latents.shape, generator=self.generator, device=self.generator.device,
                            dtype=torch.float32).to(latents.device)
        cond = view_embeddings(self.embeddings, azimuth)
        uncond = self.embeddings.uncond.expand(b, -1, -1)
        with torch.no_grad():
            noisy = model.scheduler.add_noise(latents.detach(), noise, t)
            eps_hat = predict_noise_cfg(model, noisy, t, cond, uncond, self.cfg.guidance_scale)
            # w(t) = 1 − ᾱ_t (DreamFusion's choice, as in DreamGaussian).
            w = 1.0 - model.alphas_cumprod[t]
            grad = w.view(-1, 1, 1, 1) * (eps_hat - noise)
            # A NaN from an fp16 overflow (or non-finite latents from the renderer or encoder) must
            # not poison every Gaussian: count it without a sync, zero the gradient, and make the
            # loss value NaN so stage 1's guard skips the step instead of stepping Adam on zeros.
            bad = (~torch.isfinite(grad)).any() | (~torch.isfinite(latents.detach())).any()
            self._nonfinite += bad.long()
            grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
        self.last_t, self.last_w = t, w
        loss = _SDSSurrogate.apply(latents, grad)
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
    # ε model because predict_noise_cfg already converts v-predictions to ε.
    sched = DDIMScheduler.from_config(model.scheduler.config, prediction_type="epsilon")
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
    out = vae.decode((latents / vae.config.scaling_factor).to(model.dtype)).sample
    return ((out.float() + 1) / 2).clamp(0, 1)
