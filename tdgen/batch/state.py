"""Incremental state: the cheap model fingerprint, the inputs hash, and the NAME.tdgen.json sidecar
that says what was made from what (a rerun skips an asset whose sidecar still vouches for it)."""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from tdgen import __version__
from tdgen.config import Config, ModelConfig, to_dict
from tdgen.io import atomic_write_text, pending_path, sha256_file

if TYPE_CHECKING:
    from tdgen.batch.specs import Asset

SIDECAR_SUFFIX = ".tdgen.json"
SIDECAR_FORMAT = 1


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
    """NAME.tdgen.json: what was made from what. Written last, atomically; inside the asset's
    `staged_outputs` the files it hashes are still under their temp names (`pending_path`)."""
    outputs = _rel_outputs(result.outputs, out_dir)
    files = {rel: sha256_file(pending_path(Path(out_dir) / rel)) for rel in sorted(set(outputs.values()))}
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
    # allow_nan=False: NaN is not JSON, and a parser in another language would reject the file.
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    return path
