"""Finding, checking and loading a diffusers Stable Diffusion model (hub id or local folder).

`load_model` is the one entry point: it locates the folder (the Hugging Face cache first, offline
aware), checks it before diffusers sees it (every component present, safetensors only, every JSON
parseable, every weight file complete), then loads the five components frozen and in eval mode.
A broken folder is a ModelFormatError naming the file (exit 3), never a diffusers traceback.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tdgen.config import ModelConfig
from tdgen.cudagraph import graph_key, graphed_call
from tdgen.errors import ModelFormatError, ModelNotFoundError, TdgenError
from tdgen.io import sha256_file

# Memory layouts measured on an H200 (benchmarks/gpu_probe.py --vae): the SD VAE encoder's
# forward+backward at 512² takes 23.6 ms in NCHW and 30.6 ms in channels_last (fp16 and bf16
# alike), so the VAE stays NCHW; the UNet keeps channels_last.
CHANNELS_LAST_UNET = True

COMPONENTS = ("tokenizer", "text_encoder", "vae", "unet", "scheduler")
WEIGHT_COMPONENTS = ("text_encoder", "vae", "unet")
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")


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
    compile_encoder: bool = False
    """Run the VAE encoder through torch.compile (set only when on CUDA and enabled)."""
    compile_decoder: bool = False
    """Run the VAE decoder through torch.compile (set only when on CUDA and enabled)."""
    compile_unet: bool = False
    """Run the UNet through torch.compile (set only when on CUDA and enabled)."""
    vae_graphs: bool = False
    """Replay the VAE encoder and decoder from CUDA graphs (set only when on CUDA and enabled)."""
    _compiled_moments: Any = field(default=None, init=False, repr=False)
    _compiled_decode: Any = field(default=None, init=False, repr=False)
    _compiled_unet: Any = field(default=None, init=False, repr=False)
    _vae_pool: Any = field(default=None, init=False, repr=False)

    def unet_forward(self, latents: Tensor, t: Tensor, emb: Tensor) -> Tensor:
        """The UNet's raw output for [B, 4, h, w] model-dtype latents, [B] timesteps and
        [B, L, D] text embeddings, compiled on CUDA with `compile_unet` (static shapes: stage 1
        and refinement each use one or two, and a shape-generic kernel would be slower)."""
        if self.compile_unet and self.device.type == "cuda":
            out = self._run_compiled("unet", "_compiled_unet", self._unet, latents, t, emb,
                                     dynamic=False)
            if out is not None:
                return out
        return self._unet(latents, t, emb)

    def _unet(self, latents: Tensor, t: Tensor, emb: Tensor) -> Tensor:
        return self.unet(latents, t, encoder_hidden_states=emb, return_dict=False)[0]

    def latent_dist(self, x: Tensor):
        """The VAE's posterior for images x [B, 3, H, W] in [-1, 1] (model dtype): a diffusers
        DiagonalGaussianDistribution over [B, 4, H/8, W/8], differentiable w.r.t. x.

        On CUDA the encoder's mid-block attention (one head of 512 channels over (H/8)² tokens)
        runs on PyTorch's math SDPA backend: flash and cuDNN attention take heads of at most 256,
        so SDPA would pick memory-efficient attention, whose backward at one head took 5.3 ms of
        a 40 ms SDS step on an H200 (benchmarks/encoder_speed.py)."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        if self.device.type != "cuda":
            return self.vae.encode(x).latent_dist
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.MATH]):
            out = (graphed_call(self.graphs, graph_key("encoder", x), self._encoder, (x,),
                                "VAE encoder", pool=self._vae_graph_pool())
                   if self.vae_graphs else None)
            return DiagonalGaussianDistribution(self._encoder(x) if out is None else out)

    def _encoder(self, x: Tensor) -> Tensor:  # [B, 3, H, W] → [B, 8, H/8, W/8], compiled or eager
        out = (self._run_compiled("encoder", "_compiled_moments", self._moments, x)
               if self.compile_encoder else None)
        return self._moments(x) if out is None else out

    def _moments(self, x: Tensor) -> Tensor:  # [B, 3, H, W] → [B, 8, H/8, W/8]
        enc = self.vae.encoder(x)
        return enc if self.vae.quant_conv is None else self.vae.quant_conv(enc)

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:  # unscaled latents [B, 4, h, w] → [B, 3, 8h, 8w] in ~[-1, 1]
        """The VAE decoder, without grad (image-space SDS targets, img2img, samples).

        On CUDA with `compile_decoder` it runs through torch.compile: at 512² it is the largest
        single cost of an image-space SDS step (a forward over 512² × 128–512 channels whose
        GroupNorm/SiLU pairs inductor fuses); its attention on the math backend, as the
        encoder's."""
        if self.device.type != "cuda" or not (self.compile_decoder or self.vae_graphs):
            return self.vae.decode(z).sample
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.MATH]):
            out = None
            if self.vae_graphs:
                out = graphed_call(self.graphs, graph_key("decoder", z), self._decoder, (z,),
                                   "VAE decoder", pool=self._vae_graph_pool())
            return self._decoder(z) if out is None else out

    def _vae_graph_pool(self):
        """One memory pool for the VAE's no-grad graphs: they replay one after another and each
        output is cloned before the next replay, so their intermediates may share memory."""
        if self._vae_pool is None:
            self._vae_pool = torch.cuda.graph_pool_handle()
        return self._vae_pool

    def _decoder(self, z: Tensor) -> Tensor:  # [B, 4, h, w] → [B, 3, 8h, 8w], compiled or eager
        out = (self._run_compiled("decoder", "_compiled_decode", self._decode, z)
               if self.compile_decoder else None)
        return self._decode(z) if out is None else out

    def _run_compiled(self, part: str, cache: str, fn, *args, dynamic: bool | None = None):
        """`fn(*args)` through torch.compile, the compiled function kept in attribute `cache`;
        None when compiling or running it fails: a compiler missing or failing must not fail the
        asset, so it warns once and turns `compile_<part>` off for the calls after."""
        try:
            if getattr(self, cache) is None:
                _inductor_cache_default()
                setattr(self, cache, torch.compile(fn, dynamic=dynamic))
            return getattr(self, cache)(*args)
        except Exception as exc:
            label = "UNet" if part == "unet" else f"VAE {part}"
            warnings.warn(f"torch.compile of the {label} failed, running it eagerly "
                          f"(set model.compile_{part}=false to skip the attempt): {exc!r:.300}")
            setattr(self, f"compile_{part}", False)
            return None

    def _decode(self, z: Tensor) -> Tensor:  # [B, 4, h, w] → [B, 3, 8h, 8w]
        if getattr(self.vae, "post_quant_conv", None) is not None:
            z = self.vae.post_quant_conv(z)
        return self.vae.decoder(z)

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
                   model_id: str, source: dict, tiny_vae=None, cuda_graphs: bool = True,
                   compile_encoder: bool = False, compile_decoder: bool = False,
                   compile_unet: bool = False, vae_graphs: bool = False) -> DiffusionModel:
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
                           cuda_graphs=bool(cuda_graphs and device.type == "cuda"),
                           compile_encoder=bool(compile_encoder and device.type == "cuda"),
                           compile_decoder=bool(compile_decoder and device.type == "cuda"),
                           compile_unet=bool(compile_unet and device.type == "cuda"),
                           vae_graphs=bool(vae_graphs and device.type == "cuda"))
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
    check_model_files(folder, model_id)


def _redownload_fix(model_id: str) -> str:
    if Path(model_id).expanduser().is_dir():
        return "replace it from a good copy of the model (or re-save it with diffusers' save_pretrained)"
    return f"run 'hf download {model_id} --force-download' for a fresh copy"


def _safetensors_problem(path: Path) -> str | None:
    """Why `path` is not a complete safetensors file, or None. Reads only its header: a
    truncated copy (an interrupted download, a full disk) is caught without loading GBs."""
    size = path.stat().st_size
    if size < 8:
        return f"is {size} bytes long, too short for a safetensors header"
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        if n > min(size - 8, 100 << 20):
            return "has a header length beyond the end of the file (truncated or not safetensors)"
        try:
            header = json.loads(fh.read(n))
        except (ValueError, UnicodeDecodeError):
            return "has an unreadable header (not a safetensors file)"
    if not isinstance(header, dict):
        return "has an unreadable header (not a safetensors file)"
    ends = [t["data_offsets"][1] for k, t in header.items()
            if k != "__metadata__" and isinstance(t, dict) and len(t.get("data_offsets", ())) == 2]
    expected = 8 + n + max(ends, default=0)
    if size < expected:
        return f"is truncated ({size} of {expected} bytes)"
    return None


def check_model_files(folder: Path, model_id: str) -> None:
    """ModelFormatError naming the first JSON that does not parse or weight file that is
    incomplete under `folder` (what diffusers would otherwise report as an OSError traceback)."""
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or p.name.startswith("."):
            continue
        rel = p.relative_to(folder).as_posix()
        if p.suffix == ".json":
            try:
                data = json.loads(p.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as e:
                where = f" at line {e.lineno}" if isinstance(e, json.JSONDecodeError) else ""
                raise ModelFormatError(f"model {model_id!r}: {rel} is not valid JSON{where}; "
                                       f"{_redownload_fix(model_id)}") from None
            if not isinstance(data, dict):
                raise ModelFormatError(f"model {model_id!r}: {rel} is not a JSON object; "
                                       f"{_redownload_fix(model_id)}")
        elif p.suffix == ".safetensors":
            problem = _safetensors_problem(p)
            if problem:
                raise ModelFormatError(f"model {model_id!r}: {rel} {problem}; {_redownload_fix(model_id)}")


@contextlib.contextmanager
def _loading(model_id: str, part: str):
    """Whatever diffusers/transformers raise for a component that passed our checks (a config
    with wrong fields, weights of the wrong shapes) becomes one line naming the component."""
    try:
        yield
    except TdgenError:
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise ModelFormatError(f"model {model_id!r}: {part} could not be loaded ({type(e).__name__}: "
                               f"{first}); {_redownload_fix(model_id)}") from None


_HASH_CACHE: dict[tuple[str, int, int], str] = {}


def cache_root() -> Path:
    """tdgen's cache folder: $TDGEN_CACHE_DIR, else $XDG_CACHE_HOME/tdgen, else ~/.cache/tdgen."""
    return Path(os.environ.get("TDGEN_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "tdgen"))


def _inductor_cache_default() -> None:
    # Inductor's own default is under /tmp, which a reboot empties: the encoder's first compile
    # takes ~30 s and a cached one ~2.5 s, so keep its cache beside ours unless the user set one.
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "inductor"))


def hash_cache_file() -> Path:
    """Where file hashes persist between runs: `hashes.json` in `cache_root()`."""
    return cache_root() / "hashes.json"


def _read_disk_cache(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):  # absent, unreadable or torn: a cache, so start over
        return {}


def _hash_cached(path: Path) -> str:
    """sha256 of `path`, remembered per (absolute path, size, mtime) in this process and on disk.

    Hashing SD's 2.6 GB of weights took 16 s of every cold `tdgen make`; a file whose size and
    mtime are unchanged is taken to be unchanged (as make and rsync do)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key in _HASH_CACHE:
        return _HASH_CACHE[key]
    disk_key = f"{key[0]}|{key[1]}|{key[2]}"
    cache_file = hash_cache_file()
    digest = _read_disk_cache(cache_file).get(disk_key)
    if not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
        digest = sha256_file(path)
        # Written at once, not through tdgen.io's atomic writes: those join a run's staged
        # outputs, which a failed run discards, and the hash is right whatever the run does.
        tmp = cache_file.with_name(f".{cache_file.name}.{os.getpid()}.tmp")
        try:  # re-read, so concurrent runs each add their entries; write whole, then rename
            entries = _read_disk_cache(cache_file)
            entries[disk_key] = digest
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(entries, indent=0, sort_keys=True))
            os.replace(tmp, cache_file)
        except OSError:  # a read-only home is no reason to fail a generation
            with contextlib.suppress(OSError):
                tmp.unlink()
    _HASH_CACHE[key] = digest
    return digest


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


def weights_bytes(model_id: str, revision: str = "main") -> int | None:
    """Total size of the safetensors weights of a local folder or an already cached hub model
    (None when unknown: not cached, or not a folder). Only stats files: nothing is loaded."""
    folder = Path(model_id).expanduser()
    if not folder.is_dir():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(model_id, "model_index.json", revision=revision)
        except Exception:  # a malformed id, an odd cache: "unknown" is the honest answer
            return None
        if not isinstance(cached, str):
            return None
        folder = Path(cached).parent
    total = 0
    for p in folder.rglob("*.safetensors"):
        with contextlib.suppress(OSError):
            total += p.stat().st_size
    return total or None


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

    Raises ModelNotFoundError (not cached/found, incomplete folder) or ModelFormatError (pickles,
    a JSON that does not parse, truncated weights, a component diffusers cannot load).
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    device = torch.device(device)
    dtype = resolve_dtype(cfg.dtype, device)
    folder, source = _locate(cfg.id, cfg.revision, _hub_patterns())
    _check_folder(folder, cfg.id)

    kw = _pretrained_kwargs()
    with quiet_hf_progress():
        with _loading(cfg.id, "tokenizer/"):
            tokenizer = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))
        with _loading(cfg.id, "text_encoder/"):
            text_encoder = CLIPTextModel.from_pretrained(str(folder / "text_encoder"), dtype=dtype,
                                                         use_safetensors=True)
        with _loading(cfg.id, "vae/"):
            vae = AutoencoderKL.from_pretrained(str(folder / "vae"), torch_dtype=dtype, **kw)
        with _loading(cfg.id, "unet/"):
            unet = UNet2DConditionModel.from_pretrained(str(folder / "unet"), torch_dtype=dtype, **kw)
    # DDIM from the model's own config: SD ships a PNDM config with the same betas, and SDS only
    # needs the training schedule (ᾱ_t) plus a deterministic sampler for img2img.
    # clip_sample off whatever the config says: it clips DDIM's x0 estimate to [-1, 1], which is
    # for pixel-space models; latents are not bounded so. SD's own config says false, but a PNDM
    # config without the key (PNDM has no such option) makes DDIM default to True, and then
    # img2img targets and samples come out wrong (a trained toy prior drew a chair for every
    # prompt until this was found).
    with _loading(cfg.id, "scheduler/"):
        scheduler = DDIMScheduler.from_pretrained(str(folder), subfolder="scheduler",
                                                  clip_sample=False)
    if scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
        raise ModelFormatError(
            f"model {cfg.id!r} predicts {scheduler.config.prediction_type!r}; tdgen supports "
            "epsilon and v_prediction models, pass --model with one of those")

    tiny_vae = None
    if cfg.sds_encoder == "tiny":
        tiny_vae, tiny_source = load_tiny_encoder(cfg.tiny_encoder_id, cfg.revision, dtype)
        source = {**source, "sds_encoder": tiny_source}
    return assemble_model(tokenizer, text_encoder, vae, unet, scheduler, device, dtype, cfg.id,
                          source, tiny_vae=tiny_vae, cuda_graphs=cfg.cuda_graphs,
                          compile_encoder=cfg.compile_encoder, compile_decoder=cfg.compile_decoder,
                          compile_unet=cfg.compile_unet, vae_graphs=cfg.vae_graphs)


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
    check_model_files(folder, model_id)
    with quiet_hf_progress(), _loading(model_id, "the tiny encoder"):
        module = AutoencoderTiny.from_pretrained(str(folder), torch_dtype=dtype,
                                                 **_pretrained_kwargs())
    return module, source
