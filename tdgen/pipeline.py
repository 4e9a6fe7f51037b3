"""The one place that knows the stage order: prompt → splat → mesh → UV → texture → .glb.

`generate` runs everything for a prompt; `mesh_from_splat` runs stage 2 on any INRIA-layout 3DGS
`.ply`. Both take a loaded model (so a batch loads it once) and report through `on_progress`.
"""

from __future__ import annotations

import glob
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch

from tdgen import __version__
from tdgen.config import Config, dump_toml, text_problem, validate
from tdgen.errors import GenerationError, InputError
from tdgen.io import atomic_write_text, check_writable, pending_path, sha256_file, staged_outputs
from tdgen.meshdata import Mesh
from tdgen.progress import Progress, ProgressFn, no_progress
from tdgen.runtime import deterministic, make_generator, resolve_device

if TYPE_CHECKING:
    from tdgen.gaussians import Gaussians
    from tdgen.guidance import DiffusionModel, PromptEmbeddings

OUTPUT_SUFFIXES = (".glb", ".ply")


@dataclass
class GenerateResult:
    outputs: dict[str, Path] = field(default_factory=dict)
    """What was written: glb, lods, preview, splat, config."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds per stage (and `total`)."""
    counts: dict[str, int] = field(default_factory=dict)
    """Gaussians, vertices, triangles, texels, steps."""
    sha256: str = ""
    """sha256 of the main output file (.glb, or .ply for a splat-only run)."""

    def to_json(self) -> dict:
        return {
            "outputs": {k: str(v) for k, v in self.outputs.items()},
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
            "counts": dict(self.counts),
            "sha256": self.sha256,
            "version": __version__,
        }


class _Timer:
    """Wall-clock per stage; synchronises CUDA so GPU work is charged to the stage that did it."""

    def __init__(self, device: torch.device, timings: dict[str, float]):
        self.device = device
        self.timings = timings

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0


class _MeshClock:
    """Splits the mesh stage's wall time into its parts (grid, marching cubes, clean, decimate,
    normals) from the progress events extract_mesh already sends, so benchmarks can report them
    without the stage returning timings of its own."""

    PARTS = {"grid": "grid", "marching": "marching_cubes", "clean": "clean", "decimate": "decimate", "normals": "normals"}

    def __init__(self, on_progress: ProgressFn, timings: dict[str, float]):
        self.on_progress = on_progress
        self.timings = timings
        # created right before extract_mesh: everything until the first non-grid event is the grid
        self.part: str | None = "grid"
        self.t0 = time.perf_counter()

    def __call__(self, p: Progress) -> None:
        if p.stage in ("grid", "mesh"):
            word = "grid" if p.stage == "grid" else (p.message.split() or [""])[0]
            part = self.PARTS.get(word)
            if part != self.part:
                now = time.perf_counter()
                if self.part is not None:
                    key = f"mesh.{self.part}"
                    self.timings[key] = self.timings.get(key, 0.0) + now - self.t0
                self.part, self.t0 = part, now
        self.on_progress(p)


def check_output_path(out: Path, allowed: tuple[str, ...] = OUTPUT_SUFFIXES) -> Path:
    """Fail before any work if the output path cannot be written (a probe file is created and
    removed in its folder, which is created if missing)."""
    out = Path(out)
    if out.suffix.lower() not in allowed:
        raise InputError(
            f"output {out} must end in {' or '.join(allowed)}; e.g. -o chair{allowed[0]}"
        )
    if out.exists() and out.is_dir():
        raise InputError(f"output {out} is a folder; give a file name such as {out / ('asset' + allowed[0])}")
    parent = out.parent if str(out.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise InputError(f"cannot write {out}: {parent} is not a folder")
    check_writable(parent)
    return out


def check_prompt(prompt: str, what: str = "the prompt") -> str:
    """InputError for an empty prompt or one that is not valid text."""
    if not prompt or not prompt.strip():
        raise InputError(f"{what} is empty; pass a description such as \"a red chair\"")
    problem = text_problem(prompt)
    if problem:
        raise InputError(f"{what} {problem}")
    return prompt


LOD_MIN_TRIANGLES = 12
"""A level would have fewer triangles than this: an error names the fix instead."""
LOD_MIN_TEXTURE = 128
"""LOD textures halve per level down to this size (texels)."""


def _extract_surfaces(gaussians, cfg: Config, dev, timings: dict[str, float],
                      on_progress: ProgressFn) -> tuple[Mesh, Mesh | None]:
    """The decimated mesh, and (with `texture.normal_map` on a lit asset) the cleaned
    marching-cubes surface it was decimated from, which the normal map is baked against (else
    None)."""
    from dataclasses import replace

    from tdgen.mesh import decimate, extract_mesh, vertex_normals

    clock = _MeshClock(on_progress, timings)
    if not (cfg.texture.normal_map and cfg.export.shading == "lit"):
        return extract_mesh(gaussians, cfg.mesh, dev, on_progress=clock), None
    # extract_mesh with a budget it never reaches skips its decimation; the same decimate() with
    # the real budget then gives exactly the mesh extract_mesh would have returned.
    high = extract_mesh(gaussians, replace(cfg.mesh, triangles=2**62), dev, on_progress=clock)
    # the clock charges this to mesh.decimate from the progress events, as for extract_mesh's own
    clock(Progress("mesh", 2, 4, message=f"decimate {high.num_faces} → {cfg.mesh.triangles}"))
    v, f = decimate(high.vertices, high.faces, cfg.mesh.triangles, cfg.mesh.min_component)
    mesh = Mesh(vertices=v.astype(np.float32), faces=f, normals=vertex_normals(v, f))
    clock(Progress("mesh", 4, 4, message=f"{mesh.num_faces} triangles"))
    return mesh, high


def _build_lods(surface: Mesh, textured: Mesh, texture, cfg: Config, dev,
                high: Mesh | None = None) -> list[tuple[Mesh, object, object]]:
    """`cfg.export.lods` (mesh, texture, normal map or None) levels, level k with 1/2^k of the
    triangles; each normal map baked from `high` (the surface before decimation) when given."""
    from dataclasses import replace

    from tdgen.mesh import decimate, vertex_normals
    from tdgen.normalmap import bake_normal_map
    from tdgen.texture import transfer_texture
    from tdgen.unwrap import unwrap_mesh

    out = []
    for level in range(1, cfg.export.lods + 1):
        target = textured.num_faces >> level
        if target < LOD_MIN_TRIANGLES:
            raise GenerationError(
                f"export.lods={cfg.export.lods}: level {level} would have {target} triangles "
                f"(from {textured.num_faces}); lower export.lods or raise mesh.triangles")
        v, f = decimate(surface.vertices, surface.faces, target, cfg.mesh.min_component)
        low = Mesh(vertices=v.astype(np.float32), faces=f, normals=vertex_normals(v, f))
        size = max(LOD_MIN_TEXTURE, int(cfg.texture.size) >> level)
        low = unwrap_mesh(low, replace(cfg.texture, size=size))
        normal = None if high is None else bake_normal_map(high, low, cfg.texture, size)
        out.append((low, transfer_texture(textured, texture, low, size, device=dev, seed=cfg.seed),
                    normal))
    return out


def _stale_lods(out: Path, lods: int) -> list[Path]:
    """LOD files of an earlier run beyond this run's count of LOD files (0 when its layout keeps
    the levels inside the .glb): they go when this run commits."""
    pattern = re.compile(rf"^{re.escape(out.stem)}_lod(\d+){re.escape(out.suffix)}$")
    return [p for p in out.parent.glob(f"{glob.escape(out.stem)}_lod*{out.suffix}")
            if (m := pattern.match(p.name)) and int(m.group(1)) > lods]


def _lod_files(cfg: Config) -> int:
    """How many NAME_lodN.glb files this run writes."""
    return cfg.export.lods if cfg.export.lod_layout == "files" else 0


def config_path_for(out: Path) -> Path:
    """Where the resolved config of an output goes: NAME.config.toml beside it."""
    return out.with_name(out.stem + ".config.toml")


def generate(
    prompt: str,
    cfg: Config,
    out: Path | str,
    *,
    device: str | torch.device = "auto",
    model: "DiffusionModel | None" = None,
    on_progress: ProgressFn = no_progress,
) -> GenerateResult:
    """Text → asset. `out` ending in `.glb` runs both stages; `.ply` stops after the splat."""
    # 1. check inputs, before the model loads
    check_prompt(prompt)
    validate(cfg)
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    out = check_output_path(Path(out))  # last: it creates the folder if missing
    result = GenerateResult()
    timer = _Timer(dev, result.timings)
    t_start = time.perf_counter()
    # Every file below is written under a temp name and renamed only when the whole run has
    # succeeded: a failure (or Ctrl-C) leaves the previous asset's files as they were.
    with staged_outputs() as staged, deterministic(dev):
        _generate(prompt, cfg, out, dev, model, timer, result, on_progress)
        for p in _stale_lods(out, _lod_files(cfg)):
            staged.remove_on_commit(p)
        _finish(cfg, out, result, t_start)
    return result


def _generate(prompt, cfg: Config, out: Path, dev, model, timer: _Timer, result: GenerateResult,
              on_progress: ProgressFn) -> None:
    from tdgen.gaussians import save_ply
    from tdgen.guidance import SDSGuidance
    from tdgen.optimize import optimize_gaussians

    # 2.-3. load the diffusion model (unless the caller shares one) and encode the prompt once
    model, embeddings = _model_and_embeddings(prompt, cfg, dev, model, timer, on_progress)

    # 4. stage 1: Gaussians optimised with score distillation
    generator = make_generator(cfg.seed, dev)
    guidance = SDSGuidance(model, embeddings, cfg.stage1, generator)
    with timer("stage1"):
        s1 = optimize_gaussians(guidance, cfg.stage1, dev, generator, on_progress=on_progress)
    gaussians = s1.gaussians
    result.counts["stage1_steps"] = s1.steps
    result.counts["gaussians"] = gaussians.num

    # 5. the splat itself
    splat_path = out if out.suffix.lower() == ".ply" else out.with_suffix(".ply")
    if out.suffix.lower() == ".ply" or cfg.export.splat:
        with timer("splat"):
            save_ply(gaussians.detach().to("cpu"), splat_path)
        result.outputs["splat"] = splat_path

    if out.suffix.lower() == ".ply":
        result.sha256 = sha256_file(pending_path(out))
    else:
        # 6. stage 2: mesh, UVs, texture, export
        _stage2(gaussians, cfg, out, dev, model, embeddings, generator, timer, result, on_progress)
    # 7. the resolved config beside the output (written by the caller, last)


def mesh_from_splat(
    ply: Path | str,
    cfg: Config,
    out: Path | str,
    *,
    device: str | torch.device = "auto",
    model: "DiffusionModel | None" = None,
    prompt: str | None = None,
    on_progress: ProgressFn = no_progress,
) -> GenerateResult:
    """Any INRIA-layout 3DGS `.ply` → textured `.glb`. With a prompt, the texture is refined
    against the diffusion model (loaded here unless passed in); without one it is baked only."""
    from tdgen.gaussians import load_ply

    # 1. check inputs before any heavy work
    if prompt is not None and prompt.strip():
        check_prompt(prompt, "--prompt")
    validate(cfg)
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    out = check_output_path(Path(out), (".glb",))  # last: it creates the folder if missing
    result = GenerateResult()
    timer = _Timer(dev, result.timings)
    t_start = time.perf_counter()
    with timer("read"):
        gaussians = load_ply(ply)
    result.counts["gaussians"] = gaussians.num

    # 2. a model only when refinement can use it
    embeddings = None
    refine = prompt is not None and prompt.strip() != "" and cfg.texture.refine_steps > 0
    if refine:
        model, embeddings = _model_and_embeddings(prompt, cfg, dev, model, timer, on_progress)
    else:
        model = None

    # 3. stage 2, its files committed together with the config (4.) once all succeeded
    generator = make_generator(cfg.seed, dev)
    with staged_outputs() as staged, deterministic(dev):
        _stage2(gaussians.to(dev), cfg, out, dev, model, embeddings, generator, timer, result, on_progress)
        for p in _stale_lods(out, _lod_files(cfg)):
            staged.remove_on_commit(p)
        _finish(cfg, out, result, t_start)
    return result


def _model_and_embeddings(prompt, cfg: Config, dev, model, timer: _Timer, on_progress: ProgressFn):
    from tdgen.guidance import encode_prompt, load_model

    if model is None:
        on_progress(Progress("load", 0, 1, message=cfg.model.id))
        with timer("load"):
            model = load_model(cfg.model, dev)
        on_progress(Progress("load", 1, 1))
    with timer("encode"):
        embeddings = encode_prompt(
            model, prompt, negative=cfg.stage1.negative_prompt, view_prompts=cfg.stage1.view_prompts
        )
    return model, embeddings


def _finish(cfg: Config, out: Path, result: GenerateResult, t_start: float) -> GenerateResult:
    cfg_path = config_path_for(out)
    atomic_write_text(cfg_path, dump_toml(cfg))
    result.outputs["config"] = cfg_path
    result.timings["total"] = time.perf_counter() - t_start
    return result


def _stage2(
    gaussians: "Gaussians",
    cfg: Config,
    out: Path,
    dev: torch.device,
    model: "DiffusionModel | None",
    embeddings: "PromptEmbeddings | None",
    generator: torch.Generator,
    timer: _Timer,
    result: GenerateResult,
    on_progress: ProgressFn,
) -> None:
    from tdgen.collision import collision_shapes
    from tdgen.export import export_glb
    from tdgen.normalmap import bake_normal_map
    from tdgen.preview import write_preview, write_turntable
    from tdgen.refine import refine_texture
    from tdgen.texture import bake_texture
    from tdgen.unwrap import unwrap_mesh

    from tdgen.config import parse_crop
    from tdgen.gaussians import normalize_splat

    # Stage 1's frame whatever the splat's source (a captured scene in any unit, optionally cropped).
    gaussians = normalize_splat(gaussians.detach(), parse_crop(cfg.mesh.crop))

    # a. splat → volume (depth fusion or density) → marching cubes → clean → decimate; the
    # normal map needs the surface before decimation too (`high`)
    with timer("mesh"):
        mesh, high = _extract_surfaces(gaussians, cfg, dev, result.timings, on_progress)

    # b. UV atlas
    surface = mesh  # closed, seamless: what LODs are decimated from
    on_progress(Progress("unwrap", 0, 1))
    with timer("unwrap"):
        mesh = unwrap_mesh(mesh, cfg.texture)
    on_progress(Progress("unwrap", 1, 1))

    # c. colours from the splat into the texture
    with timer("bake"):
        texture = bake_texture(gaussians, mesh, cfg.texture, dev, on_progress=on_progress)

    # d. UV-space refinement against the diffusion model's img2img targets
    if model is not None and embeddings is not None and cfg.texture.refine_steps > 0:
        with timer("refine"):
            texture = refine_texture(
                mesh, texture, model, embeddings, cfg.texture, dev, generator, on_progress=on_progress
            )

    # d′. the fine surface's normals baked onto the decimated mesh, in its tangent frame
    normal_map = None
    if high is not None:
        on_progress(Progress("normalmap", 0, 1))
        with timer("normalmap"):
            normal_map = bake_normal_map(high, mesh, cfg.texture)
        on_progress(Progress("normalmap", 1, 1))

    # e. LODs: each level decimated from the closed surface, re-unwrapped at half the texture
    # size of the last, its texture transferred from the full asset's (refinement included)
    lods = None
    if cfg.export.lods > 0:
        with timer("lods"):
            lods = _build_lods(surface, mesh, texture, cfg, dev, high)

    # f. collision shapes from the closed surface (seamless: what a decomposition needs)
    collision = []
    if cfg.export.collision != "none":
        with timer("collision"):
            collision = collision_shapes(surface, cfg.export)

    # g. the .glb (and LODs), then the preview people look at before importing
    on_progress(Progress("export", 0, 1))
    with timer("export"):
        exported = export_glb(mesh, texture, cfg.export, out, lods=lods, collision=collision,
                              normal_map=normal_map)
    result.outputs["glb"] = out
    for i, p in enumerate(exported.paths[1:], start=1):
        result.outputs[f"lod{i}"] = p
    if cfg.export.preview:
        preview = out.with_name(out.stem + ".preview.png")
        with timer("preview"):
            write_preview(mesh, texture, preview)
        result.outputs["preview"] = preview
    if cfg.export.turntable:
        turntable = out.with_name(out.stem + ".turntable.webp")
        with timer("turntable"):
            write_turntable(mesh, texture, turntable)
        result.outputs["turntable"] = turntable
    on_progress(Progress("export", 1, 1))

    result.counts["vertices"] = exported.vertices
    result.counts["triangles"] = exported.triangles
    result.counts["texture_size"] = exported.texture_size
    result.counts["texels"] = exported.texture_size**2
    if exported.collision_hulls:
        result.counts["collision_hulls"] = exported.collision_hulls
    result.sha256 = sha256_file(pending_path(out))
