"""Many assets in one run: prompt lists and manifests, incremental reruns, failure isolation, workers.

    specs  = load_batch_file("assets.toml")            # parse; InputError with file:line
    assets = plan_assets(specs, preset=None, sets={})  # resolve every config up front
    summary = run_batch(assets, Path("out"))           # skip what is current, isolate failures

Modules: `specs` (prompt lists, manifests, names, planning), `state` (inputs hash, sidecars, the
incremental skip), `runners` (failure isolation; in-process, per-GPU processes, Ray).

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
.glb, ``NAME.preview.png``, ``NAME.config.toml``, ``NAME.ply``, LODs) and the sidecar
``NAME.tdgen.json``, all renamed into place together once the asset succeeded, the sidecar last:
a failed asset leaves its previous files and sidecar as they were, and an asset without a current
sidecar is simply regenerated.
"""

from tdgen.batch.report import write_report
from tdgen.batch.runners import AssetResult, AssetRunner, BatchSummary, Status, run_batch
from tdgen.batch.specs import (
    MANIFEST_ASSET_KEYS,
    MANIFEST_TOP_KEYS,
    NAME_MAX,
    SAFE_NAME,
    Asset,
    AssetSpec,
    check_name,
    load_batch_file,
    parse_manifest,
    parse_prompt_list,
    plan_assets,
    select_assets,
    slugify,
    stable_seed,
)
from tdgen.batch.state import (
    SIDECAR_FORMAT,
    SIDECAR_SUFFIX,
    inputs_hash,
    is_current,
    model_key,
    read_sidecar,
    sidecar_path,
    write_sidecar,
)

__all__ = [
    "Asset", "AssetResult", "AssetRunner", "AssetSpec", "BatchSummary", "MANIFEST_ASSET_KEYS",
    "MANIFEST_TOP_KEYS", "NAME_MAX", "SAFE_NAME", "SIDECAR_FORMAT", "SIDECAR_SUFFIX", "Status",
    "check_name", "inputs_hash", "is_current", "load_batch_file", "model_key", "parse_manifest",
    "parse_prompt_list", "plan_assets", "read_sidecar", "run_batch", "select_assets",
    "sidecar_path", "slugify", "stable_seed", "write_report", "write_sidecar",
]
