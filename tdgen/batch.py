"""Many assets in one run: prompt lists and manifests, incremental reruns, failure isolation, workers.

    specs  = load_batch_file("assets.toml")            # parse; InputError with file:line
    assets = plan_assets(specs, preset=None, sets={})  # resolve every config up front
    summary = run_batch(assets, Path("out"))           # skip what is current, isolate failures

Two input formats (both UTF-8):

* **Prompt list** (any suffix but ``.toml``): one prompt per line. Blank lines and lines whose first
  non-blank character is ``#`` are ignored (a ``#`` later in a line is part of the prompt). A line is
  *named* when it starts with ``NAME:`` followed by a space, a tab or the end of the line, where
  NAME is 1–64 of ``A–Z a–z 0–9 _ -`` starting with a letter or digit (no spaces); the prompt is the
  rest after the first colon. Anything else is an unnamed prompt, colons and all (``12:30 clock``,
  ``a sign saying "open: 24h"``). To keep a prompt that itself starts with ``word: ``, name it:
  ``marine: Warhammer: a space marine``.
* **Manifest** (``.toml``): ``[[asset]]`` tables with ``prompt`` and optional ``name``,
  ``negative``, ``seed``, ``preset`` and ``set = { "stage1.steps" = 300 }``; top-level ``preset``,
  ``negative``, ``seed`` and ``set`` are defaults for every asset. Unknown keys are errors.

Names are file names: lowercase ``[a-z0-9_-]``, at most 64 characters; an unnamed prompt gets a
slug of itself. Two assets whose names are equal ignoring case are an error naming both lines.

Config precedence, weakest first: code defaults → preset (command line, else the asset's, else
the file's, else `standard`) → the file's ``set`` → the asset's ``set``/``negative``/``seed`` →
the command line's ``--set``/``--negative``. A seed nobody sets is a stable hash of the name (and
of the file's top-level ``seed``, which therefore re-rolls every asset at once), never of the
list order, so reordering or inserting lines changes nothing.

Outputs per asset, in the output folder: what `pipeline.generate` writes for ``NAME.glb`` (the
.glb, ``NAME.preview.png``, ``NAME.config.toml``, ``NAME.ply``, LODs), then the sidecar
``NAME.tdgen.json`` — written last, so an asset without a current sidecar is simply regenerated.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import os
import queue as queue_mod
import re
import sys
import time
import tomllib
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence

from tdgen import __version__
from tdgen.config import Config, ModelConfig, resolve_config, to_dict
from tdgen.errors import ConfigError, DeviceError, InputError, TdgenError
from tdgen.io import atomic_write_text, remove_stale_temps, sha256_file
from tdgen.progress import Progress

log = logging.getLogger(__name__)

NAME_MAX = 64
SIDECAR_SUFFIX = ".tdgen.json"
SIDECAR_FORMAT = 1
_NAME_CHARS = r"[A-Za-z0-9][A-Za-z0-9_-]*"
_NAMED_LINE = re.compile(rf"^({_NAME_CHARS}):(?:[ \t]|$)")
SAFE_NAME = re.compile(rf"^[a-z0-9][a-z0-9_-]{{0,{NAME_MAX - 1}}}$")
# Names Windows refuses as file stems whatever the extension.
_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}
_LOD_NAME = re.compile(r"^(.+)_lod\d+$")

MANIFEST_TOP_KEYS = ("preset", "negative", "seed", "set", "asset")
MANIFEST_ASSET_KEYS = ("name", "prompt", "negative", "seed", "preset", "set")

Status = Literal["done", "skipped", "failed"]
GenerateFn = Callable[..., Any]
LoadModelFn = Callable[[ModelConfig, Any], Any]


# ---------------------------------------------------------------------------------------------
# Parsed inputs


@dataclass(frozen=True)
class AssetSpec:
    """One asset as written in a prompt list or manifest, before its config is resolved."""

    name: str
    """Safe output name (lowercase [a-z0-9_-])."""
    prompt: str
    where: str
    """``FILE:LINE`` of the asset, for error messages."""
    negative: str | None = None
    seed: int | None = None
    preset: str | None = None
    sets: Mapping[str, Any] = field(default_factory=dict)
    """Flat ``{"section.key": value}`` changes: the file's defaults, then the asset's own."""
    seed_base: int = 0
    """The file's top-level seed, mixed into the name hash when `seed` is None."""


@dataclass(frozen=True)
class Asset:
    """A fully resolved asset: what a worker needs, and the hash that decides skipping."""

    name: str
    prompt: str
    cfg: Config
    where: str
    inputs_sha256: str = ""
    model_key: Mapping[str, Any] = field(default_factory=dict)
    """The cheap model fingerprint hashed into `inputs_sha256` (see :func:`model_key`)."""


@dataclass
class AssetResult:
    name: str
    status: Status
    reason: str = ""
    """One line; empty unless failed (or why it was skipped)."""
    outputs: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "reason": self.reason,
            "outputs": dict(self.outputs),
            "seconds": round(self.seconds, 3),
        }


@dataclass
class BatchSummary:
    results: list[AssetResult] = field(default_factory=list)
    seconds: float = 0.0
    interrupted: bool = False

    def names(self, status: Status) -> list[str]:
        return [r.name for r in self.results if r.status == status]

    def to_json(self) -> dict[str, Any]:
        return {
            "summary": True,
            "done": len(self.names("done")),
            "skipped": len(self.names("skipped")),
            "failed": len(self.names("failed")),
            "failed_names": self.names("failed"),
            "seconds": round(self.seconds, 3),
        }

    def raise_for_failures(self) -> None:
        """BatchError (exit 5) when any asset failed; the finished ones stay on disk."""
        from tdgen.errors import BatchError

        failed = self.names("failed")
        if failed:
            shown = ", ".join(failed[:5]) + (", …" if len(failed) > 5 else "")
            raise BatchError(
                f"{len(failed)} of {len(self.results)} assets failed ({shown}); fix the reasons "
                "above and rerun the same command: finished assets are skipped"
            )


# ---------------------------------------------------------------------------------------------
# Names


def slugify(text: str) -> str:
    """A safe, readable file name from free text: ``"A Red Chair!"`` → ``"a_red_chair"``."""
    # NFKD splits accents off letters so "café" keeps its "e" instead of losing the letter.
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    slug = re.sub(r"[^a-z0-9]+", "_", ascii_text.lower()).strip("_")
    if len(slug) > NAME_MAX:
        cut = slug[:NAME_MAX]
        # Cut at a word boundary when one is not too far back, so slugs stay readable.
        head = cut.rsplit("_", 1)[0] if "_" in cut[NAME_MAX // 2 :] else cut
        slug = head.strip("_")
    slug = slug or "asset"
    return slug + "_" if slug in _RESERVED else slug


def check_name(name: str, where: str) -> str:
    """Validate an explicit name and return it lowercased; InputError naming the fix otherwise."""
    if not re.fullmatch(_NAME_CHARS, name):
        raise InputError(
            f"{where}: name {name!r} is not a safe file name; use letters, digits, _ and - "
            f"(starting with a letter or digit), e.g. {slugify(name)!r}"
        )
    if len(name) > NAME_MAX:
        raise InputError(f"{where}: name {name[:20]!r}… is longer than {NAME_MAX} characters; shorten it")
    low = name.lower()
    if low in _RESERVED:
        raise InputError(f"{where}: name {name!r} is reserved on Windows; choose another, e.g. {low + '_'!r}")
    return low


def _check_unique(specs: Sequence[AssetSpec]) -> None:
    seen: dict[str, AssetSpec] = {}
    for s in specs:
        # Names are already lowercase, so this also catches "Robot" vs "robot".
        if s.name in seen:
            first = seen[s.name]
            raise InputError(
                f"duplicate asset name {s.name!r} at {first.where} and {s.where}; give one of them "
                "another name (`name: prompt` in a list, name = \"…\" in a manifest)"
            )
        seen[s.name] = s
    for s in specs:
        m = _LOD_NAME.match(s.name)
        if m and m.group(1) in seen:
            raise InputError(
                f"asset name {s.name!r} at {s.where} clashes with the LOD files of {m.group(1)!r} at "
                f"{seen[m.group(1)].where}; rename one of them"
            )


def stable_seed(name: str, base: int = 0) -> int:
    """A seed from the asset's name (and a base), identical on every machine and run."""
    digest = hashlib.sha256(f"{base}\0{name}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFF_FFFF


# ---------------------------------------------------------------------------------------------
# Parsers


def _decode(data: bytes, source: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise InputError(f"{source}:{line}: not valid UTF-8; save the file as UTF-8") from None


def _lines(text: str) -> list[str]:
    # Only \n, \r\n and \r end a line: str.splitlines() also splits on form feeds and U+2028,
    # which would make our line numbers disagree with every editor's.
    return re.split(r"\r\n|\n|\r", text)


def parse_prompt_list(text: str, source: str = "<prompts>") -> list[AssetSpec]:
    """Parse a prompt list (see the module docstring for the exact rules)."""
    specs: list[AssetSpec] = []
    for i, raw in enumerate(_lines(text), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{source}:{i}"
        m = _NAMED_LINE.match(line)
        if m:
            name = check_name(m.group(1), where)
            prompt = line[m.end() :].strip()
            if not prompt:
                raise InputError(f"{where}: {m.group(1)!r} has no prompt after the colon; write `{m.group(1)}: a prompt`")
        else:
            prompt = line
            name = slugify(prompt)
        specs.append(AssetSpec(name=name, prompt=prompt, where=where))
    if not specs:
        raise InputError(f"{source}: no prompts found; write one prompt per line")
    _check_unique(specs)
    return specs


def _flatten_sets(value: Any, where: str, prefix: str = "") -> dict[str, Any]:
    """``set`` as ``{"stage1.steps" = 1}`` or nested ``{stage1 = {steps = 1}}``, flattened."""
    if not isinstance(value, dict):
        raise InputError(f"{where}: `set` must be a table such as {{ \"stage1.steps\" = 300 }}")
    out: dict[str, Any] = {}
    for k, v in value.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten_sets(v, where, key + "."))
        else:
            out[key] = v
    return out


def _table_lines(text: str, table: str) -> list[int]:
    # tomllib reports no positions for parsed values, so find each [[asset]] header ourselves.
    pattern = re.compile(rf"^\s*\[\[\s*{table}\s*\]\]")
    return [i for i, line in enumerate(_lines(text), start=1) if pattern.match(line)]


def _key_line(lines: Sequence[str], key: str, start: int = 1, stop: int | None = None) -> int | None:
    """First line in [start, stop) that assigns `key` (``key =``, ``"key" =``, ``key.x =``, ``[key]``)."""
    k = re.escape(key)
    pattern = re.compile(rf"""^\s*(?:(?:{k}|"{k}"|'{k}')\s*[=.]|\[\s*(?:asset\.)?{k}\s*\])""")
    for i in range(start, min(stop or len(lines) + 1, len(lines) + 1)):
        if pattern.match(lines[i - 1]):
            return i
    return None


def _typed(value: Any, tp: type, key: str, where: str) -> Any:
    ok = isinstance(value, tp) and not (tp is int and isinstance(value, bool))
    if not ok:
        kind = {str: "a string", int: "an integer"}[tp]
        raise InputError(f"{where}: `{key}` must be {kind}, got {value!r}")
    return value


def parse_manifest(text: str, source: str = "<manifest>") -> list[AssetSpec]:
    """Parse a TOML manifest of ``[[asset]]`` tables (see the module docstring)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"line (\d+)", str(e))
        where = f"{source}:{m.group(1)}" if m else source
        raise InputError(f"{where}: not valid TOML ({e}); fix the file") from None
    lines = _lines(text)
    headers = _table_lines(text, "asset")

    def top_where(key: str) -> str:
        line = _key_line(lines, key, 1, headers[0] if headers else None)
        return f"{source}:{line}" if line else source

    for key in data:
        if key not in MANIFEST_TOP_KEYS:
            raise InputError(
                f"{top_where(key)}: unknown top-level key {key!r}; valid keys: {', '.join(MANIFEST_TOP_KEYS)}"
            )
    preset = _typed(data["preset"], str, "preset", top_where("preset")) if "preset" in data else None
    negative = _typed(data["negative"], str, "negative", top_where("negative")) if "negative" in data else None
    seed_base = _typed(data["seed"], int, "seed", top_where("seed")) if "seed" in data else 0
    top_sets = _flatten_sets(data["set"], top_where("set")) if "set" in data else {}
    assets = data.get("asset", [])
    if not isinstance(assets, list) or not assets or not all(isinstance(a, dict) for a in assets):
        raise InputError(f"{source}: no assets found; add [[asset]] tables with a prompt")
    specs = []
    for k, table in enumerate(assets):
        # Header lines map to tables only when every asset is a [[asset]] block (not an inline array).
        located = len(headers) == len(assets)
        where = f"{source}:{headers[k]}" if located else f"{source} (asset #{k + 1})"
        for key in table:
            if key not in MANIFEST_ASSET_KEYS:
                if located:
                    nxt = headers[k + 1] if k + 1 < len(headers) else None
                    where = f"{source}:{_key_line(lines, key, headers[k], nxt) or headers[k]}"
                raise InputError(
                    f"{where}: unknown key {key!r} in [[asset]]; valid keys: {', '.join(MANIFEST_ASSET_KEYS)}"
                )
        if "prompt" not in table:
            raise InputError(f"{where}: [[asset]] has no prompt; add prompt = \"…\"")
        prompt = _typed(table["prompt"], str, "prompt", where).strip()
        if not prompt:
            raise InputError(f"{where}: the prompt is empty; write what to make, e.g. prompt = \"a red chair\"")
        name = check_name(_typed(table["name"], str, "name", where), where) if "name" in table else slugify(prompt)
        specs.append(
            AssetSpec(
                name=name,
                prompt=prompt,
                where=where,
                negative=_typed(table["negative"], str, "negative", where) if "negative" in table else negative,
                seed=_typed(table["seed"], int, "seed", where) if "seed" in table else None,
                preset=_typed(table["preset"], str, "preset", where) if "preset" in table else preset,
                sets={**top_sets, **(_flatten_sets(table["set"], where) if "set" in table else {})},
                seed_base=seed_base,
            )
        )
    _check_unique(specs)
    return specs


def load_batch_file(path: str | os.PathLike) -> list[AssetSpec]:
    """A ``.toml`` manifest or (any other suffix) a prompt list, parsed and checked."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{path} does not exist; check the path of the prompt list or manifest") from None
    except IsADirectoryError:
        raise InputError(f"{path} is a folder; pass a prompt list (.txt) or a manifest (.toml)") from None
    except OSError as e:
        raise InputError(f"cannot read {path} ({e.strerror}); check its permissions") from None
    text = _decode(data, str(path))
    if path.suffix.lower() == ".toml":
        return parse_manifest(text, str(path))
    return parse_prompt_list(text, str(path))


# ---------------------------------------------------------------------------------------------
# Planning: configs and the inputs hash


def _weights_key(model_id: str, revision: str) -> dict[str, Any]:
    key: dict[str, Any] = {"id": model_id}
    folder = Path(model_id).expanduser()
    if folder.is_dir():
        key["id"] = str(folder.resolve())
        key["files"] = {
            p.relative_to(folder).as_posix(): f"{p.stat().st_size}:{p.stat().st_mtime_ns}"
            for p in sorted(folder.rglob("*"))
            if p.is_file()
        }
        return key
    key["revision"] = revision
    with contextlib.suppress(Exception):  # any cache oddity just means "not resolved"
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model_id, "model_index.json", revision=revision)
        if isinstance(cached, str):
            key["revision"] = Path(cached).parent.name  # .../snapshots/<commit>/model_index.json
    return key


def model_key(mc: ModelConfig) -> dict[str, Any]:
    """A cheap fingerprint of the weights a config will load, without loading (or hashing) them.

    A local folder: the size and mtime of every file — not their sha256 as `model.source` has,
    so that deciding skips never reads gigabytes. A hub id: the snapshot commit the local cache
    resolves the revision to (what `guidance.load_model` would load offline), or the revision
    string itself while the model is not cached. Deliberately avoids importing
    `tdgen.guidance` (torch + diffusers): an all-skipped rerun should take a second.
    """
    key = _weights_key(mc.id, mc.revision)
    if mc.sds_encoder == "tiny":
        # guidance loads the tiny encoder at its own "main", whatever the SD model's revision.
        key["sds_encoder"] = _weights_key(mc.tiny_encoder_id, "main")
    return key


def inputs_hash(prompt: str, cfg: Config, model: Mapping[str, Any], version: str = __version__) -> str:
    """sha256 over everything that determines an asset: a match means "already made"."""
    payload = {
        "prompt": prompt,
        "negative": cfg.stage1.negative_prompt,
        "config": to_dict(cfg),  # includes the seed
        "model": model,
        "tdgen": version,
    }
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def plan_assets(
    specs: Sequence[AssetSpec],
    *,
    preset: str | None = None,
    sets: Mapping[str, Any] | None = None,
    negative: str | None = None,
) -> list[Asset]:
    """Resolve every asset's config (errors name the asset's line) and its inputs hash.

    `preset`, `sets` and `negative` come from the command line and win over the file.
    """
    sets = dict(sets or {})
    # Check the command line's own changes first, so their errors are not blamed on line 1.
    resolve_config(preset or "standard", sets)
    keys: dict[ModelConfig, dict[str, Any]] = {}
    assets = []
    for s in specs:
        changes: dict[str, Any] = dict(s.sets)
        if s.negative is not None:
            changes["stage1.negative_prompt"] = s.negative
        if s.seed is not None:
            changes["seed"] = s.seed
        changes.update(sets)
        if negative is not None:
            changes["stage1.negative_prompt"] = negative
        if "seed" not in changes:
            changes["seed"] = stable_seed(s.name, s.seed_base)
        try:
            cfg = resolve_config(preset or s.preset or "standard", changes)
        except ConfigError as e:
            raise ConfigError(f"{s.where} ({s.name}): {e}") from None
        if cfg.model not in keys:
            keys[cfg.model] = model_key(cfg.model)
        mk = keys[cfg.model]
        assets.append(Asset(s.name, s.prompt, cfg, s.where, inputs_hash(s.prompt, cfg, mk), mk))
    return assets


def select_assets(assets: Sequence[Asset], only: Iterable[str] | None) -> list[Asset]:
    """Keep the named assets (``--only``; comma-separated values allowed), in file order."""
    if not only:
        return list(assets)
    wanted = {n.strip().lower() for item in only for n in item.split(",") if n.strip()}
    valid = [a.name for a in assets]
    unknown = sorted(wanted - set(valid))
    if unknown:
        shown = ", ".join(valid[:30]) + (", …" if len(valid) > 30 else "")
        raise InputError(f"--only: unknown asset name(s) {', '.join(unknown)}; valid names: {shown}")
    return [a for a in assets if a.name in wanted]


# ---------------------------------------------------------------------------------------------
# Sidecars and skipping


def sidecar_path(out_dir: Path, name: str) -> Path:
    return Path(out_dir) / f"{name}{SIDECAR_SUFFIX}"


def read_sidecar(out_dir: Path, name: str) -> dict[str, Any] | None:
    try:
        data = json.loads(sidecar_path(out_dir, name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_current(asset: Asset, out_dir: Path) -> dict[str, Any] | None:
    """The sidecar when `asset` is already made with these inputs and its files are intact."""
    data = read_sidecar(out_dir, asset.name)
    if data is None or data.get("inputs_sha256") != asset.inputs_sha256:
        return None
    files = data.get("files")
    if not isinstance(files, dict) or f"{asset.name}.glb" not in files:
        return None
    try:
        # Every recorded output, not just the .glb: a torn preview is as wrong as a torn mesh.
        if any(sha256_file(Path(out_dir) / rel) != digest for rel, digest in files.items()):
            return None
    except OSError:
        return None
    return data


def _rel_outputs(outputs: Mapping[str, Any], out_dir: Path) -> dict[str, str]:
    rel = {}
    for kind, p in outputs.items():
        p = Path(p)
        with contextlib.suppress(ValueError):
            p = p.resolve().relative_to(Path(out_dir).resolve())
        rel[kind] = str(p)
    return rel


def write_sidecar(asset: Asset, out_dir: Path, result: Any, model_source: Mapping[str, Any], seconds: float) -> Path:
    """NAME.tdgen.json: what was made from what. Written last, atomically."""
    outputs = _rel_outputs(result.outputs, out_dir)
    files = {rel: sha256_file(Path(out_dir) / rel) for rel in sorted(set(outputs.values()))}
    data = {
        "format": SIDECAR_FORMAT,
        "name": asset.name,
        "prompt": asset.prompt,
        "negative": asset.cfg.stage1.negative_prompt,
        "seed": asset.cfg.seed,
        "config": to_dict(asset.cfg),
        "model": dict(model_source),
        "model_key": dict(asset.model_key),
        "tdgen_version": __version__,
        "sha256": result.sha256,
        "outputs": outputs,
        "files": files,
        "timings": {k: round(float(v), 4) for k, v in result.timings.items()},
        "counts": dict(result.counts),
        "seconds": round(seconds, 3),
        "inputs_sha256": asset.inputs_sha256,
        "source": asset.where,
    }
    path = sidecar_path(out_dir, asset.name)
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# The worker body (in-process, one process per GPU, or a Ray actor)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    msg = text[0] if text else ""
    msg = msg if isinstance(e, TdgenError) else f"{type(e).__name__}: {msg}".rstrip(": ")
    return msg[:300]


def _free_accelerator() -> None:
    # After an OOM the failed asset's tensors are only garbage once its frames are gone; collect
    # them, then hand the cached blocks back so the next asset starts from an empty GPU.
    gc.collect()
    torch = sys.modules.get("torch")  # not imported yet: nothing can be cached on a GPU
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _default_generate(*args: Any, **kwargs: Any) -> Any:
    from tdgen.pipeline import generate

    return generate(*args, **kwargs)


def _default_load_model(cfg: ModelConfig, device: Any) -> Any:
    from tdgen.guidance import load_model
    from tdgen.runtime import resolve_device

    return load_model(cfg, resolve_device(device) if isinstance(device, str) else device)


class AssetRunner:
    """Makes assets one at a time, loading each distinct model once and keeping it.

    `generate_fn` / `load_model_fn` default to `pipeline.generate` / `guidance.load_model`; tests
    pass stand-ins (top-level functions, so worker processes and Ray actors can import them).
    """

    def __init__(
        self,
        device: str = "auto",
        generate_fn: GenerateFn | None = None,
        load_model_fn: LoadModelFn | None = None,
    ):
        # Passed on as a name: generate and load_model resolve it, and a worker that only skips
        # or fails never pays for importing torch.
        self.device = device
        self.generate_fn = generate_fn or _default_generate
        self.load_model_fn = load_model_fn or _default_load_model
        self._models: dict[ModelConfig, Any] = {}

    def _model(self, mc: ModelConfig) -> Any:
        # Keyed by the whole ModelConfig (id, revision, dtype, encoder, …): any of them changes the
        # loaded weights. One model at a time, so a mixed batch cannot pile models up on the GPU;
        # run_batch groups assets by model so each loads once per worker.
        if mc not in self._models:
            self._models.clear()
            gc.collect()
            try:
                self._models[mc] = self.load_model_fn(mc, self.device)
            except Exception as e:
                # Remember the failure: every asset on this model would fail the same way, and a
                # missing model should not cost one slow hub lookup per asset.
                self._models[mc] = e
        model = self._models[mc]
        if isinstance(model, Exception):
            raise model
        return model

    def run(
        self,
        asset: Asset,
        out_dir: str | os.PathLike,
        on_progress: Callable[[Progress], None] | None = None,
    ) -> AssetResult:
        """Make one asset; any Exception becomes a `failed` result (KeyboardInterrupt propagates)."""
        out_dir = Path(out_dir)
        t0 = time.perf_counter()
        try:
            # A stale sidecar must not survive a half-made asset (it would vouch for old files).
            sidecar_path(out_dir, asset.name).unlink(missing_ok=True)
            model = self._model(asset.cfg.model)
            result = self.generate_fn(
                asset.prompt,
                asset.cfg,
                out_dir / f"{asset.name}.glb",
                device=self.device,
                model=model,
                on_progress=on_progress or (lambda _p: None),
            )
            seconds = time.perf_counter() - t0
            source = getattr(model, "source", None) or dict(asset.model_key)
            write_sidecar(asset, out_dir, result, source, seconds)
            return AssetResult(asset.name, "done", "", _rel_outputs(result.outputs, out_dir), seconds)
        except Exception as e:
            if not isinstance(e, TdgenError) and not _is_oom(e):
                log.warning("asset %s failed", asset.name, exc_info=True)  # a bug: keep the traceback
            reason = _one_line(e)
        # Freed only here, outside the except block: while it runs, the traceback keeps the failed
        # asset's frames (and their CUDA tensors) alive.
        _free_accelerator()
        return AssetResult(asset.name, "failed", reason, {}, time.perf_counter() - t0)


def _is_oom(e: BaseException) -> bool:
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    return "out of memory" in str(e).lower()


# ---------------------------------------------------------------------------------------------
# Backends


ResultFn = Callable[[AssetResult], None]
ProgressByName = Callable[[str, Progress], None]


def _run_local(assets, out_dir, device, generate_fn, load_model_fn, on_result, on_progress) -> None:
    runner = AssetRunner(device, generate_fn, load_model_fn)
    for a in assets:
        on_result(runner.run(a, out_dir, lambda p, n=a.name: on_progress(n, p)))


def _mp_worker(tasks, results, device, generate_fn, load_model_fn) -> None:
    """One process per GPU: pull assets until the None sentinel, send progress and results back."""
    runner = AssetRunner(device, generate_fn, load_model_fn)
    try:
        while True:
            item = tasks.get()
            if item is None:
                return
            asset, out_dir = item
            results.put(("start", os.getpid(), asset.name))
            res = runner.run(asset, out_dir, lambda p, n=asset.name: results.put(("progress", n, p)))
            results.put(("result", os.getpid(), res))
    except KeyboardInterrupt:
        return  # the parent cleans the temp files and reports the interruption


def _run_processes(assets, out_dir, gpus, device, generate_fn, load_model_fn, on_result, on_progress) -> None:
    import multiprocessing as mp

    # spawn, not fork: a forked child would inherit the parent's CUDA state (if any) and
    # CUDA_VISIBLE_DEVICES must be in the environment before the child imports torch.
    ctx = mp.get_context("spawn")
    tasks, results = ctx.Queue(), ctx.Queue()
    for a in assets:
        tasks.put((a, str(out_dir)))
    procs = []
    # A spawned child copies os.environ when it starts, i.e. before it imports torch: the only
    # moment CUDA_VISIBLE_DEVICES (and torch's CPU thread count) reliably take effect.
    child_env = {"CUDA_VISIBLE_DEVICES": None, "OMP_NUM_THREADS": None}
    saved = {k: os.environ.get(k) for k in child_env}
    if saved["OMP_NUM_THREADS"] is None:
        # Each worker would otherwise take every core for its CPU-side work; share them out.
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // len(gpus)))
    try:
        for gpu in gpus:
            tasks.put(None)
            os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
            p = ctx.Process(
                target=_mp_worker,
                args=(tasks, results, device, generate_fn, load_model_fn),
                name=f"tdgen-gpu{gpu}",
                daemon=True,
            )
            p.start()
            procs.append(p)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    running: dict[int, str] = {}  # pid → asset name
    pending = {a.name for a in assets}
    try:
        while pending:
            try:
                msg = results.get(timeout=0.5)
            except queue_mod.Empty:
                for p in procs:
                    if not p.is_alive() and p.pid in running:
                        name = running.pop(p.pid)
                        pending.discard(name)
                        on_result(AssetResult(name, "failed", f"worker process died (exit code {p.exitcode})"))
                if not any(p.is_alive() for p in procs):
                    for name in sorted(pending):
                        on_result(AssetResult(name, "failed", "no worker process left to run it"))
                    return
                continue
            if msg[0] == "start":
                running[msg[1]] = msg[2]
            elif msg[0] == "progress":
                on_progress(msg[1], msg[2])
            else:
                running.pop(msg[1], None)
                pending.discard(msg[2].name)
                on_result(msg[2])
        for p in procs:
            p.join(timeout=30)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=10)


class _RayWorker:
    """The Ray actor body: an AssetRunner that lives as long as the actor (one model load)."""

    def __init__(self, device, generate_fn, load_model_fn):
        self.runner = AssetRunner(device, generate_fn, load_model_fn)

    def run(self, asset: Asset, out_dir: str) -> AssetResult:
        return self.runner.run(asset, out_dir)


def _run_ray(assets, out_dir, device, workers, generate_fn, load_model_fn, on_result) -> None:
    try:
        import ray
        from ray.util import ActorPool
    except ImportError:
        raise InputError('--backend ray needs Ray; install it with pip install "tdgen[ray]"') from None
    if not ray.is_initialized():
        # With RAY_ADDRESS set this joins that cluster; without, it starts a local one.
        ray.init()
    gpus_in_cluster = int(ray.cluster_resources().get("GPU", 0))
    use_gpus = device != "cpu" and gpus_in_cluster > 0
    n = workers or (gpus_in_cluster if use_gpus else 1)
    n = max(1, min(n, len(assets)))
    # Ray sets CUDA_VISIBLE_DEVICES per actor from num_gpus, so "cuda" is that actor's own GPU.
    opts = {"num_gpus": 1} if use_gpus else {"num_cpus": 1}
    actor_cls = ray.remote(**opts)(_RayWorker)
    actor_device = "cuda" if use_gpus else ("cpu" if device in ("auto", "cpu") else device)
    actors = [actor_cls.remote(actor_device, generate_fn, load_model_fn) for _ in range(n)]
    reported: set[str] = set()
    try:
        pool = ActorPool(actors)
        for res in pool.map_unordered(lambda actor, a: actor.run.remote(a, str(out_dir)), assets):
            reported.add(res.name)
            on_result(res)
    except ray.exceptions.RayError as e:
        # An actor died (killed, node lost): the runner's own isolation never saw it, so the
        # assets not yet reported fail with Ray's reason and a rerun picks them up.
        reason = f"Ray worker lost: {_one_line(e)}"
        for a in assets:
            if a.name not in reported:
                on_result(AssetResult(a.name, "failed", reason))
    finally:
        for actor in actors:
            with contextlib.suppress(Exception):
                ray.kill(actor)


# ---------------------------------------------------------------------------------------------
# The batch


def run_batch(
    assets: Sequence[Asset],
    out_dir: str | os.PathLike,
    *,
    force: bool = False,
    device: str = "auto",
    gpus: Sequence[int | str] | None = None,
    backend: Literal["local", "ray"] = "local",
    workers: int | None = None,
    on_result: ResultFn | None = None,
    on_progress: ProgressByName | None = None,
    generate_fn: GenerateFn | None = None,
    load_model_fn: LoadModelFn | None = None,
) -> BatchSummary:
    """Make every asset that is not already current; failures are recorded, never raised.

    `gpus` (local backend) runs one spawned worker process per listed GPU; with ``device="cpu"``
    the same plumbing runs on CPU workers (for tests). `backend="ray"` uses one actor per GPU of
    the cluster (or `workers` CPU actors); on a multi-node cluster `out_dir` must be a folder
    every node sees (shared storage), and tdgen must be installed on every node. Ctrl-C removes
    temp files and re-raises.
    """
    # 1. check arguments before touching the output folder
    if backend not in ("local", "ray"):
        raise InputError(f"unknown backend {backend!r}; use local or ray")
    if backend == "ray" and gpus:
        raise InputError("--gpus is for the local backend; with --backend ray, Ray assigns GPUs (use --workers)")
    if backend == "local" and workers is not None:
        raise InputError("--workers is for --backend ray; locally, use --gpus 0,1,… for one worker per GPU")
    if gpus and device != "cpu":
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise DeviceError("--gpus was given but PyTorch sees no CUDA GPU; drop --gpus or use --device cpu")
        bad = [g for g in gpus if not 0 <= int(g) < n]
        if bad:
            raise DeviceError(f"--gpus {','.join(map(str, bad))}: this machine has GPUs 0–{n - 1}; pick from those")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"output folder {out_dir} is a file; pass a folder with -o")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create the output folder {out_dir} ({e.strerror}); choose another -o") from None
    on_result = on_result or (lambda _r: None)
    on_progress = on_progress or (lambda _n, _p: None)
    summary = BatchSummary()
    t0 = time.perf_counter()

    def record(r: AssetResult) -> None:
        summary.results.append(r)
        on_result(r)

    # 2. temp files a killed run left behind, then skip what is current, then make the rest
    remove_stale_temps(out_dir)
    try:
        todo = []
        for a in assets:
            current = None if force else is_current(a, out_dir)
            if current is not None:
                record(AssetResult(a.name, "skipped", "up to date", dict(current.get("outputs", {}))))
            else:
                todo.append(a)
        # Grouped by model (stable within a group) so each worker loads every model only once.
        first_seen = {m: i for i, m in reversed(list(enumerate(a.cfg.model for a in todo)))}
        todo.sort(key=lambda a: first_seen[a.cfg.model])
        if todo and backend == "ray":
            _run_ray(todo, out_dir, device, workers, generate_fn, load_model_fn, record)
        elif todo and gpus:
            _run_processes(todo, out_dir, list(gpus), device, generate_fn, load_model_fn, record, on_progress)
        elif todo:
            _run_local(todo, out_dir, device, generate_fn, load_model_fn, record, on_progress)
    except KeyboardInterrupt:
        summary.interrupted = True
        raise
    finally:
        remove_stale_temps(out_dir)
        summary.seconds = time.perf_counter() - t0
    return summary
