"""Running a batch: failure isolation per asset, and the three ways to run it — in this process,
one spawned process per GPU (`--gpus`), or Ray actors (`--backend ray`).

    summary = run_batch(assets, Path("out"))           # skip what is current, isolate failures
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import queue as queue_mod
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

from tdgen.batch.specs import Asset
from tdgen.batch.state import _rel_outputs, is_current, write_sidecar
from tdgen.config import ModelConfig
from tdgen.errors import DeviceError, InputError, TdgenError
from tdgen.io import check_writable, remove_stale_temps, staged_outputs
from tdgen.progress import Progress

log = logging.getLogger("tdgen.batch")

Status = Literal["done", "skipped", "failed"]
GenerateFn = Callable[..., Any]
LoadModelFn = Callable[[ModelConfig, Any], Any]


# ---------------------------------------------------------------------------------------------
# Results


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
            model = self._model(asset.cfg.model)
            # generate's files and the sidecar form one staged set, renamed together (sidecar
            # last) only on success: a failed asset keeps its previous files and sidecar, which
            # still vouch for each other, and a rerun regenerates it from its changed inputs hash.
            with staged_outputs():
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
    temp files and re-raises. A `generate_fn` stand-in must write through `tdgen.io`
    (atomic_path / atomic_write_*) so its files join the asset's staged set, and hash them
    through `tdgen.io.pending_path`.
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
    # One up-front error for a read-only or full folder, not one traceback per asset.
    check_writable(out_dir)
    on_result = on_result or (lambda _r: None)
    on_progress = on_progress or (lambda _n, _p: None)
    summary = BatchSummary()
    t0 = time.perf_counter()

    def record(r: AssetResult) -> None:
        summary.results.append(r)
        on_result(r)

    # 2. temp files a killed run left behind (never a concurrent run's: see io.remove_stale_temps),
    #    then skip what is current, then make the rest
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
