"""Shared bits of the benchmark scripts: environment record, timing, tables, JSON out."""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from tdgen.io import atomic_write_text


def set_threads(n: int = 2) -> None:
    """Pin torch's CPU threads: numbers from a 2-core CI box and a laptop stay comparable."""
    torch.set_num_threads(max(1, min(n, os.cpu_count() or 1)))


def _pkg_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def environment(device: torch.device | str) -> dict[str, Any]:
    """What a number was measured on: device, library versions, host."""
    device = torch.device(device)
    env: dict[str, Any] = {
        "device": str(device),
        "device_name": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gsplat": _pkg_version("gsplat"),
        "diffusers": _pkg_version("diffusers"),
        "transformers": _pkg_version("transformers"),
        "tdgen": _pkg_version("tdgen"),
        "cpu_threads": torch.get_num_threads(),
        "host": platform.node(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["device_name"] = props.name
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        env["cudnn"] = torch.backends.cudnn.version()
    return env


def synchronize(device: torch.device | str) -> None:
    """Wait for queued kernels, so wall time covers the work and not just its launch."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device | str) -> tuple[Any, float]:
    """Run `fn` once; return (its result, seconds), synchronised on both ends."""
    synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - t0


def reset_peak_memory(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device | str) -> float | None:
    """Peak tensor memory since the last reset (None off CUDA, where torch does not track it)."""
    if torch.device(device).type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return format(value, fmt) if fmt else f"{value:.4g}"
    return str(value)


def format_table(rows: Sequence[dict[str, Any]], columns: Iterable[tuple[str, str, str]]) -> str:
    """Plain-text table; `columns` is (key, header, format spec), missing values print as '-'."""
    columns = list(columns)
    body = [[_cell(r.get(k), f) for k, _, f in columns] for r in rows]
    headers = [h for _, h, _ in columns]
    widths = [max([len(h)] + [len(line[i]) for line in body]) for i, h in enumerate(headers)]
    first_text = [all(not _is_number(r.get(k)) for r in rows) for k, _, _ in columns]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if left else c.rjust(w) for c, w, left in zip(cells, widths, first_text)
        ).rstrip()

    out = [line(headers), line(["-" * w for w in widths])]
    out += [line(cells) for cells in body]
    return "\n".join(out)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _jsonable(obj: Any) -> Any:
    # NaN/inf are not JSON; a failed metric becomes null rather than an unparsable file.
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return _jsonable(obj.item())
    return obj


def to_json(obj: Any) -> str:
    return json.dumps(_jsonable(obj), indent=2, sort_keys=False, allow_nan=False)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, to_json(obj) + "\n")


def log(msg: str) -> None:
    """Human-facing lines go to stderr, so stdout stays one clean JSON object with --json."""
    print(msg, file=sys.stderr, flush=True)
