"""The batch report for the people who review generated placeholders: `report.html` (one card
per asset: preview, interactive 3D view, prompt, seed, preset, status, triangles, texture, time)
and `report.md` (the same as a table, for a CI job summary), written into the output folder.

The 3D view is Google's `<model-viewer>` (Apache-2.0), shipped with tdgen (`tdgen/assets/`) and
copied beside the report, so nothing is fetched from the network. Browsers do not let a page
opened from file:// fetch files beside it: there the card shows the preview image (model-viewer's
poster), and served over HTTP (`python -m http.server` in the folder) the model turns and zooms.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from tdgen.batch.runners import BatchSummary
from tdgen.batch.specs import Asset
from tdgen.batch.state import read_sidecar
from tdgen.io import atomic_write_bytes, atomic_write_text

ASSETS = Path(__file__).resolve().parent.parent / "assets"
VIEWER = "model-viewer-umd.min.js"
"""The classic-script (UMD) build: a module script would not run from file:// in Chromium."""

STATUS_COLOURS = {"new": "#2e7d32", "changed": "#1565c0", "skipped": "#757575", "failed": "#c62828"}


def asset_status(result_status: str, had_sidecar: bool) -> str:
    """new / changed / skipped / failed: a made asset is `changed` when an earlier run's sidecar
    was there before this run, `new` otherwise."""
    if result_status == "done":
        return "changed" if had_sidecar else "new"
    return result_status


def _rows(summary: BatchSummary, assets: Sequence[Asset], out_dir: Path,
          had_sidecar: Mapping[str, bool]) -> list[dict[str, Any]]:
    by_name = {a.name: a for a in assets}
    rows = []
    for r in summary.results:
        a = by_name.get(r.name)
        side = read_sidecar(out_dir, r.name) if r.status != "failed" else None
        counts = (side or {}).get("counts", {})
        outputs = dict(r.outputs or (side or {}).get("outputs", {}))
        rows.append({
            "name": r.name,
            "status": asset_status(r.status, had_sidecar.get(r.name, False)),
            "reason": r.reason if r.status == "failed" else "",
            "prompt": a.prompt if a else (side or {}).get("prompt", ""),
            "seed": a.cfg.seed if a else (side or {}).get("seed"),
            "preset": a.preset if a else "",
            "triangles": counts.get("triangles"),
            "texture": counts.get("texture_size"),
            # A skipped asset took no time now: show what making it took.
            "seconds": (side or {}).get("seconds") if r.status == "skipped" else round(r.seconds, 1),
            "glb": outputs.get("glb", ""),
            "preview": outputs.get("preview", ""),
        })
    return rows


def _card(row: dict[str, Any]) -> str:
    e = lambda v: html.escape(str(v), quote=True)  # noqa: E731
    colour = STATUS_COLOURS[row["status"]]
    if row["glb"] and row["status"] != "failed":
        view = (f'<model-viewer src="{e(row["glb"])}" poster="{e(row["preview"])}" alt="{e(row["prompt"])}" '
                'camera-controls auto-rotate shadow-intensity="0.6" exposure="1.0"></model-viewer>')
    else:
        view = '<div class="none">no asset</div>'
    facts = [f"seed {e(row['seed'])}", e(row["preset"])]
    if row["triangles"]:
        facts.append(f"{int(row['triangles']):,} triangles")
    if row["texture"]:
        facts.append(f"{int(row['texture'])}² texture")
    if row["seconds"] is not None:
        facts.append(f"{float(row['seconds']):.1f} s")
    reason = f'<p class="reason">{e(row["reason"])}</p>' if row["reason"] else ""
    preview = (f'<a href="{e(row["preview"])}">preview</a> · ' if row["preview"] else "")
    link = f'{preview}<a href="{e(row["glb"])}">{e(row["glb"])}</a>' if row["glb"] else ""
    return (f'<div class="card" data-name="{e(row["name"])}" data-status="{e(row["status"])}">{view}'
            f'<h2>{e(row["name"])} <span class="badge" style="background:{colour}">{e(row["status"])}</span></h2>'
            f'<p class="prompt">{e(row["prompt"])}</p><p class="facts">{" · ".join(facts)}</p>{reason}'
            f'<p class="links">{link}</p></div>')


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>tdgen batch report</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font-family:system-ui,sans-serif;margin:16px;background:#f4f4f4;color:#222}
h1{font-size:20px;margin:0 0 4px}.summary{margin:0 0 16px;color:#555}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(260px,1fr));gap:12px}
.card{background:#fff;border-radius:8px;padding:10px;box-shadow:0 1px 3px #0002}
model-viewer,.none{width:100%;height:220px;background:#ddd;border-radius:6px}
.none{display:flex;align-items:center;justify-content:center;color:#888}
h2{font-size:15px;margin:8px 0 4px}.badge{color:#fff;border-radius:4px;padding:1px 6px;font-size:12px}
p{margin:2px 0;font-size:13px}.prompt{font-style:italic}.facts,.links{color:#555}
.reason{color:#c62828}
</style>
<script src="report_assets/__VIEWER__"></script></head>
<body><h1>tdgen batch report</h1><p class="summary">__SUMMARY__</p>
<div class="grid">__CARDS__</div>
<script>
// The page says when every 3D view has loaded or failed (headless checks read the title).
const views = [...document.querySelectorAll("model-viewer")];
let left = views.length, failed = 0;
const settle = (ok) => { left -= 1; if (!ok) failed += 1;
  if (left === 0) document.title = `tdgen batch report: ${views.length - failed}/${views.length} models loaded`; };
views.forEach((v) => { v.addEventListener("load", () => settle(true), { once: true });
                       v.addEventListener("error", () => settle(false), { once: true }); });
</script></body></html>
"""


def _summary_line(rows: list[dict[str, Any]], summary: BatchSummary) -> str:
    n = {s: sum(r["status"] == s for r in rows) for s in STATUS_COLOURS}
    return (f"{len(rows)} assets: {n['new']} new, {n['changed']} changed, {n['skipped']} skipped, "
            f"{n['failed']} failed in {summary.seconds:.1f} s")


def _markdown(rows: list[dict[str, Any]], line: str) -> str:
    def cell(v: Any) -> str:
        return str(v if v is not None else "").replace("|", "\\|").replace("\n", " ")

    out = ["## tdgen batch", "", line, "", "| asset | status | prompt | triangles | texture | time (s) | reason |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        secs = f"{float(r['seconds']):.1f}" if r["seconds"] is not None else ""
        out.append(f"| {cell(r['name'])} | {r['status']} | {cell(r['prompt'])} | {cell(r['triangles'])} | "
                   f"{cell(r['texture'])} | {secs} | {cell(r['reason'])} |")
    return "\n".join(out) + "\n"


def write_report(summary: BatchSummary, assets: Sequence[Asset], out_dir: str | Path,
                 had_sidecar: Mapping[str, bool]) -> tuple[Path, Path]:
    """Write `report.html` (+ `report_assets/`) and `report.md` into `out_dir` for this run's
    `summary`; `had_sidecar[name]`: the asset had a sidecar before the run (changed vs new).
    Returns (html, markdown) paths; each file is written atomically."""
    out_dir = Path(out_dir)
    rows = _rows(summary, assets, out_dir, had_sidecar)
    line = _summary_line(rows, summary)
    lib = out_dir / "report_assets"
    lib.mkdir(parents=True, exist_ok=True)
    for name in (VIEWER, "model-viewer.LICENSE"):
        if not (lib / name).is_file() or (lib / name).stat().st_size != (ASSETS / name).stat().st_size:
            atomic_write_bytes(lib / name, (ASSETS / name).read_bytes())
    page = (PAGE.replace("__VIEWER__", VIEWER).replace("__SUMMARY__", html.escape(line))
            .replace("__CARDS__", "\n".join(_card(r) for r in rows)))
    html_path, md_path = out_dir / "report.html", out_dir / "report.md"
    atomic_write_text(html_path, page)
    atomic_write_text(md_path, _markdown(rows, line))
    atomic_write_text(out_dir / "report_assets" / "rows.json", json.dumps(rows, indent=1) + "\n")
    return html_path, md_path
