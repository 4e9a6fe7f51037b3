"""Prompt lists and manifests → assets with resolved configs (the formats: see `tdgen.batch`).

    specs  = load_batch_file("assets.toml")            # parse; InputError with file:line
    assets = plan_assets(specs, preset=None, sets={})  # resolve every config up front
"""

from __future__ import annotations

import hashlib
import os
import re
import tomllib
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from tdgen.batch.state import inputs_hash, model_key
from tdgen.config import Config, ModelConfig, resolve_config
from tdgen.errors import ConfigError, InputError

NAME_MAX = 64
_NAME_CHARS = r"[A-Za-z0-9][A-Za-z0-9_-]*"
_NAMED_LINE = re.compile(rf"^({_NAME_CHARS}):(?:[ \t]|$)")
SAFE_NAME = re.compile(rf"^[a-z0-9][a-z0-9_-]{{0,{NAME_MAX - 1}}}$")
# Names Windows refuses as file stems whatever the extension.
_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}
_LOD_NAME = re.compile(r"^(.+)_lod\d+$")

MANIFEST_TOP_KEYS = ("preset", "negative", "seed", "set", "asset")
MANIFEST_ASSET_KEYS = ("name", "prompt", "negative", "seed", "preset", "set")


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
    preset: str = "standard"
    """The preset its config was resolved from (shown in the batch report)."""


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
        assets.append(Asset(s.name, s.prompt, cfg, s.where, inputs_hash(s.prompt, cfg, mk), mk,
                            preset or s.preset or "standard"))
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
