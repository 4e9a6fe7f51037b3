"""The Khronos glTF-Validator (npm package `gltf-validator`, run with Node) for tests and CI.

`npm ci` in the repository root installs it into node_modules/ (see package.json). There is no
Python port of the validator, and the Khronos build is the reference engines are checked against.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

_SCRIPT = r"""
const fs = require('fs');
const validator = require(process.argv[1]);
const bytes = new Uint8Array(fs.readFileSync(process.argv[2]));
validator.validateBytes(bytes, { maxIssues: 200, format: 'glb' })
  .then((report) => { process.stdout.write(JSON.stringify(report)); })
  .catch((err) => { process.stderr.write(String(err)); process.exit(1); });
"""


class ValidatorUnavailable(RuntimeError):
    """Node or the `gltf-validator` npm package is missing (run `npm ci` in the repo root)."""


def _package_dir() -> Path | None:
    here = Path(__file__).resolve()
    override = os.environ.get("GLTF_VALIDATOR_DIR")  # a node_modules/gltf-validator elsewhere
    candidates = [Path(override)] if override else []
    candidates += [p / "node_modules" / "gltf-validator" for p in (Path.cwd(), *here.parents)]
    for c in candidates:
        if (c / "package.json").is_file():
            return c
    return None


def validator_available() -> bool:
    """True when both `node` and the npm package can be found."""
    return shutil.which("node") is not None and _package_dir() is not None


def validate_glb(path: str | os.PathLike, timeout: float = 120.0) -> dict:
    """Validate a .glb; returns the report's `issues`: numErrors, numWarnings, numInfos,
    numHints, messages (each with code, message, severity 0=error … 3=hint, pointer), truncated.
    """
    node = shutil.which("node")
    package = _package_dir()
    if node is None or package is None:
        raise ValidatorUnavailable(
            "the Khronos glTF-Validator is not installed; install Node.js and run `npm ci` in the "
            "repository root"
        )
    proc = subprocess.run(
        [node, "-e", _SCRIPT, str(package), str(Path(path).resolve())],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"gltf-validator failed on {path}: {proc.stderr.strip()[:500]}")
    return json.loads(proc.stdout)["issues"]
