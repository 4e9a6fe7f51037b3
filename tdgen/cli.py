"""The `tdgen` command: parse, call the library, print. Rich goes to stderr, JSON to stdout."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Callable, List, Optional, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeRemainingColumn
from rich.table import Table

# Busy-waiting OpenMP threads make a CPU run many times slower as soon as anything else shares
# the cores (measured: stage 1 of --preset smoke, 2 busy cores, 70 s → 5.5 s); must be set
# before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from tdgen import __version__  # noqa: E402
from tdgen.errors import TdgenError  # noqa: E402

app = typer.Typer(
    name="tdgen",
    help="Game-ready textured 3D assets (.glb) from a text prompt.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)
T = TypeVar("T")

PresetOpt = typer.Option("standard", "--preset", "-p", help="Preset: draft, standard or quality.")
SetOpt = typer.Option(None, "--set", "-s", help="Override a setting: section.key=value (repeatable).")
ConfigOpt = typer.Option(None, "--config", help="Start from a config TOML (e.g. one written beside an earlier output).")
DeviceOpt = typer.Option("auto", "--device", help="auto, cuda or cpu.")
JsonOpt = typer.Option(False, "--json", help="Print one JSON object on stdout (outputs, timings, counts, sha256).")
ModelOpt = typer.Option(None, "--model", "-m", help="Hub id or local diffusers folder (sets model.id).")


_state = {"debug": False}


def _debug() -> bool:
    return _state["debug"] or os.environ.get("TDGEN_DEBUG", "").lower() not in ("", "0", "false", "no")


def _error(message: str, code: int) -> typer.Exit:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _is_oom(e: BaseException) -> bool:
    torch = sys.modules.get("torch")
    if isinstance(e, MemoryError) or (torch is not None and isinstance(e, torch.cuda.OutOfMemoryError)):
        return True
    # CUDA says "out of memory"; torch's CPU allocator says "can't allocate memory".
    text = str(e).lower()
    return isinstance(e, RuntimeError) and any(w in text for w in ("out of memory", "can't allocate memory"))


def _run(fn: Callable[[], T]) -> T:
    """Turn a TdgenError into one red line and its exit code. Anything else is a bug: one line
    saying so, and its traceback with --debug (or TDGEN_DEBUG=1)."""
    try:
        return fn()
    except TdgenError as e:
        if _debug():
            traceback.print_exc()
        raise _error(str(e), e.exit_code) from None
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]")
        raise typer.Exit(130) from None
    except (typer.Exit, typer.Abort):
        raise
    except BrokenPipeError:
        # `tdgen presets --show quality | head`: the reader has gone, which is not an error.
        # Python's own advice: point stdout at devnull so the exit-time flush stays quiet too.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(0) from None
    except Exception as e:
        if _debug():
            raise
        first = (str(e).strip().splitlines() or [""])[0][:300]
        if _is_oom(e):
            raise _error(f"out of memory ({first}); lower the sizes: --preset draft, or --set "
                         "stage1.resolution=… mesh.grid=… texture.size=…", 1) from None
        raise _error(f"unexpected {type(e).__name__}: {first}; this is a bug in tdgen: rerun with "
                     "--debug (or TDGEN_DEBUG=1) for the traceback and report it", 1) from None


def _resolve(preset: str, sets: Optional[List[str]], config_file: Optional[Path], **shortcuts):
    from tdgen.config import load_toml_file, parse_set_args, resolve_config, shortcut_layers

    layers = [(load_toml_file(config_file), str(config_file))] if config_file is not None else []
    return resolve_config(preset, parse_set_args(sets or []), layers=layers + shortcut_layers(**shortcuts))


class _Bars:
    """Rich progress bars on stderr, one per stage, fed by the library's Progress events.

    Nothing is shown (not the note, not a bar) until the model has loaded or the first real stage
    starts: a missing model or a bad input stays the one line of its error.
    """

    def __init__(self, enabled: bool, note: str | None = None):
        self.enabled = enabled
        self.note = note
        self.started = False
        self.rich = RichProgress(
            TextColumn("[bold]{task.description:<8}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
            console=err,
            transient=False,
            disable=not enabled,
        )
        self.tasks: dict[str, int] = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.started:
            self.rich.stop()
        return False

    def __call__(self, p) -> None:
        if p.stage == "load" and p.step == 0:
            return  # shown once it has succeeded (a download shows Hugging Face's own bar)
        if not self.started:
            self.started = True
            if self.note:
                err.print(f"[yellow]note:[/] {escape(self.note)}", highlight=False, soft_wrap=True)
            self.rich.start()
        if not self.enabled:
            return
        info = []
        if p.loss is not None:
            info.append(f"loss {p.loss:.4g}")
        if p.message:
            info.append(p.message)
        if p.stage not in self.tasks:
            self.tasks[p.stage] = self.rich.add_task(p.stage, total=max(p.total, 1), info="")
        self.rich.update(self.tasks[p.stage], completed=p.step, total=max(p.total, 1), info="  ".join(info))


def _print_result(result, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(result.to_json(), allow_nan=False))
        return
    for kind, path in result.outputs.items():
        err.print(f"[green]wrote[/] {kind:<8} {path}")
    total = result.timings.get("total")
    counts = ", ".join(f"{k} {v}" for k, v in result.counts.items())
    err.print(f"done in {total:.1f} s — {counts}" if total is not None else counts)


def _version_cb(value: bool) -> None:
    if value:
        typer.echo(f"tdgen {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: bool = typer.Option(False, "--version", callback=_version_cb, is_eager=True, help="Print the version."),
    debug: bool = typer.Option(False, "--debug", help="Show the Python traceback of any error (also TDGEN_DEBUG=1)."),
) -> None:
    """Game-ready textured 3D assets (.glb) from a text prompt."""
    _state["debug"] = debug


def _cpu_note(cfg, preset: str) -> str:
    """What a CPU run of these settings is like, from the size of the model's weights."""
    from tdgen.model import weights_bytes

    size = weights_bytes(cfg.model.id, cfg.model.revision)
    work = f"{cfg.stage1.steps} SDS steps at {cfg.stage1.resolution} px"
    if size is not None and size < 200e6:
        hint = "" if preset == "smoke" else "; --preset smoke takes about 15 s"
        return f"running on the CPU with a small test model ({size / 1e6:.0f} MB): the asset is noise ({work}{hint})"
    return (f"running on the CPU: a full-size model takes seconds per step here ({work}); "
            "use a machine with a CUDA GPU (see tdgen doctor)")


@app.command()
def make(
    prompt: str = typer.Argument(..., help='What to make, e.g. "a red wooden chair".'),
    out: Path = typer.Option(..., "--out", "-o", help="Output .glb (or .ply for the stage-1 splat only)."),
    preset: str = PresetOpt,
    set_: Optional[List[str]] = SetOpt,
    config_file: Optional[Path] = ConfigOpt,
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed (sets seed)."),
    model: Optional[str] = ModelOpt,
    negative: Optional[str] = typer.Option(None, "--negative", help="Negative prompt."),
    lods: Optional[int] = typer.Option(None, "--lods", help="Extra levels of detail: NAME_lod1.glb, … (or inside NAME.glb: export.lod_layout)"),
    device: str = DeviceOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Generate a textured .glb from a text prompt."""

    def go():
        from tdgen.pipeline import generate
        from tdgen.runtime import resolve_device

        cfg = _resolve(preset, set_, config_file, seed=seed, model=model, negative=negative, lods=lods)
        dev = resolve_device(device)
        note = _cpu_note(cfg, preset) if dev.type == "cpu" else None
        with _Bars(enabled=err.is_terminal or not as_json, note=note) as bars:
            return generate(prompt, cfg, out, device=dev, on_progress=bars)

    _print_result(_run(go), as_json)


@app.command()
def mesh(
    splat: Path = typer.Argument(..., help="A 3D Gaussian Splatting .ply (INRIA layout, SH degree 0–3)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output .glb."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Refine the texture towards this prompt (loads the model)."),
    preset: str = PresetOpt,
    set_: Optional[List[str]] = SetOpt,
    config_file: Optional[Path] = ConfigOpt,
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed of the texture refinement (sets seed)."),
    model: Optional[str] = ModelOpt,
    negative: Optional[str] = typer.Option(None, "--negative", help="Negative prompt of the texture refinement."),
    lods: Optional[int] = typer.Option(None, "--lods", help="Extra levels of detail: NAME_lod1.glb, … (or inside NAME.glb: export.lod_layout)"),
    crop: Optional[str] = typer.Option(
        None, "--crop", help="Mesh only the Gaussians inside this box, xmin,ymin,zmin,xmax,ymax,zmax "
        "in the splat's coordinates (an object in a captured scene); --crop=-1,0,-1,1,2,1."),
    device: str = DeviceOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Turn a Gaussian splat .ply into a textured, UV-unwrapped .glb."""

    def go():
        from tdgen.pipeline import mesh_from_splat

        cfg = _resolve(preset, set_, config_file, seed=seed, model=model, negative=negative, lods=lods, crop=crop)
        unused = [flag for flag, v in (("--model", model), ("--negative", negative)) if v is not None]
        note = None
        if unused and not prompt:
            note = f"{' and '.join(unused)} only shape the texture refinement; add --prompt TEXT to refine"
        with _Bars(enabled=err.is_terminal or not as_json, note=note) as bars:
            return mesh_from_splat(splat, cfg, out, device=device, prompt=prompt, on_progress=bars)

    _print_result(_run(go), as_json)


# BATCH-COMMAND (parse, call tdgen.batch, print)
@app.command()
def batch(
    source: Path = typer.Argument(..., help="A prompt list (.txt) or a TOML manifest (.toml)."),
    out_dir: Path = typer.Option(Path("out"), "--out", "-o", help="Output folder (NAME.glb, NAME.tdgen.json, …)."),
    preset: Optional[str] = typer.Option(None, "--preset", "-p", help="Preset for every asset (default: the file's, else standard)."),
    set_: Optional[List[str]] = SetOpt,
    negative: Optional[str] = typer.Option(None, "--negative", help="Negative prompt for every asset."),
    model: Optional[str] = ModelOpt,
    only: Optional[List[str]] = typer.Option(None, "--only", help="Only these asset names (repeatable, or comma-separated)."),
    force: bool = typer.Option(False, "--force", help="Regenerate every asset, even those that are up to date."),
    device: str = DeviceOpt,
    gpus: Optional[str] = typer.Option(None, "--gpus", help="One worker process per GPU, e.g. --gpus 0,1,2,3."),
    backend: str = typer.Option("local", "--backend", help='local, or ray (pip install "tdgen\\[ray]"; honours RAY_ADDRESS).'),
    workers: Optional[int] = typer.Option(None, "--workers", help="Ray: number of actors (default: one per GPU, else 1)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON line per asset on stdout as it finishes, then a summary line."),
    report: bool = typer.Option(False, "--report", help="Write report.html (cards with previews and 3D views) and report.md into the output folder."),
) -> None:
    """Generate every asset of a prompt list or manifest; only what changed is regenerated."""
    from tdgen import batch as b
    from tdgen.config import parse_set_args
    from tdgen.errors import InputError

    def go():
        sets = parse_set_args(set_ or [])
        if model is not None:
            sets["model.id"] = model
        gpu_list = [g.strip() for g in gpus.split(",") if g.strip()] if gpus else None
        if gpu_list and not all(g.isdigit() for g in gpu_list):
            raise InputError(f"--gpus {gpus!r}: expected GPU indices such as 0,1,2")
        if backend not in ("local", "ray"):
            raise InputError(f"--backend {backend!r}: use local or ray")
        # Everything is parsed and every config resolved before the first asset starts.
        assets = b.select_assets(b.plan_assets(b.load_batch_file(source), preset=preset, sets=sets, negative=negative), only)
        bars = RichProgress(
            TextColumn("[bold]{task.description:<24}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
            console=err, disable=not (err.is_terminal or not as_json),
        )
        running: dict[str, int] = {}
        overall: list[int] = []

        def started() -> RichProgress:
            # Started by the first event, so an up-front error (a read-only -o) stays one line.
            if not overall:
                bars.start()
                overall.append(bars.add_task("batch", total=len(assets), info=""))
            return bars

        def on_progress(name, p):
            started()
            if name not in running:
                running[name] = bars.add_task(name[:24], total=1, info="")
            loss = f" loss {p.loss:.4g}" if p.loss is not None else ""
            bars.update(running[name], completed=p.step, total=max(p.total, 1), info=f"{p.stage}{loss} {p.message}")

        def on_result(r):
            started()
            if r.name in running:
                bars.remove_task(running.pop(r.name))
            bars.advance(overall[0])
            if as_json:
                typer.echo(json.dumps(r.to_json(), allow_nan=False))
                sys.stdout.flush()
            colour = {"done": "green", "skipped": "dim", "failed": "red"}[r.status]
            why = f" — {escape(r.reason)}" if r.status == "failed" else ""
            bars.console.print(f"[{colour}]{r.status:<7}[/] {r.name} ({r.seconds:.1f} s){why}", highlight=False)

        had_sidecar = {a.name: b.read_sidecar(out_dir, a.name) is not None for a in assets} if report else {}
        try:
            summary = b.run_batch(
                assets, out_dir, force=force, device=device, gpus=gpu_list, backend=backend,
                workers=workers, on_result=on_result, on_progress=on_progress,
            )
        finally:
            if overall:
                bars.stop()
        if as_json:
            typer.echo(json.dumps(summary.to_json()))
        s = summary.to_json()
        err.print(f"{s['done']} done, {s['skipped']} skipped, {s['failed']} failed in {summary.seconds:.1f} s → {out_dir}")
        if report:
            page, md = b.write_report(summary, assets, out_dir, had_sidecar)
            err.print(f"report: {page} and {md} (serve the folder, e.g. python -m http.server, for the 3D views)")
        summary.raise_for_failures()

    _run(go)


@app.command()
def presets(
    show: Optional[str] = typer.Option(None, "--show", help="Print every setting of this preset with its documentation."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON on stdout: each preset's changes, or with --show every setting's value, type and doc."),
) -> None:
    """List the presets, or show one in full."""

    def go():
        from tdgen.config import describe, load_preset, preset_names, resolve_config

        if show is None:
            rows = {name: load_preset(name) for name in preset_names()}
            if as_json:
                typer.echo(json.dumps(rows))
                return
            table = Table("preset", "changes from the defaults")
            for name, changes in rows.items():
                table.add_row(name, ", ".join(f"{k}={v}" for k, v in changes.items()) or "(the defaults)")
            Console().print(table)
            return
        cfg = resolve_config(show)
        changed = set(load_preset(show))
        rows = describe(cfg)
        if as_json:
            typer.echo(json.dumps({key: {"value": value, "type": tp, "doc": doc} for key, value, tp, doc in rows}))
            return
        # TOML-shaped, so the output can be edited and passed back with --config
        typer.echo(f"# preset {show}: settings marked * differ from the defaults")
        section = ""
        for key, value, tp, doc in rows:
            sec, _, name = key.rpartition(".")
            if sec != section:
                section = sec
                typer.echo(f"\n[{sec}]")
            mark = "*" if key in changed else " "
            typer.echo(f"{name} = {value}  #{mark} ({tp}) {doc}")

    _run(go)


@app.command()
def doctor(
    model: Optional[str] = ModelOpt,
    kernels: bool = typer.Option(True, "--kernels/--no-kernels", help="Build/load gsplat's CUDA kernels (about a minute the first time)."),
    as_json: bool = typer.Option(False, "--json", help="Print the checks as a JSON list on stdout (name, status, detail, fix)."),
) -> None:
    """Check the GPU, gsplat's kernels, the model cache and free disk; each failure comes with its fix."""
    from tdgen.doctor import run_checks

    checks = _run(lambda: run_checks(model_id=model, kernels=kernels))
    if as_json:
        typer.echo(json.dumps([c.__dict__ for c in checks]))
    else:
        # Lines, not a table: a table cuts the fix commands a user must copy to the terminal's
        # width (80 columns in a pipe). soft_wrap leaves long lines whole for the terminal to wrap.
        width = max(len(c.name) for c in checks)
        for c in checks:
            status = {"ok": "[green]ok  [/]", "warn": "[yellow]warn[/]", "fail": "[red]FAIL[/]"}[c.status]
            err.print(f"{status}  {escape(c.name):<{width}}  {escape(c.detail)}", highlight=False, soft_wrap=True)
            if c.fix:
                err.print(f"      {'':<{width}}  fix: {escape(c.fix)}", highlight=False, soft_wrap=True)
    if any(c.status == "fail" for c in checks):
        raise typer.Exit(1)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
