"""Import the diffusion stack (and gsplat's CUDA extension) on a background thread while the main
thread starts up.

A fresh `tdgen make` spends seconds importing diffusers and transformers before it reads a byte of
weights (the model load itself is under a second from the page cache: benchmarks/load_speed.py).
Started first thing in a command that will need the model, the imports overlap the main thread's
own start-up (torch, the pipeline's modules, config, CUDA) wherever either waits on the disk.

Nothing here may raise or print: when a background import fails, the main thread's own import
of the same module fails the same way and reports it as usual. `TDGEN_PREFETCH=0` turns it off
(for measuring what it saves: benchmarks/speed.py --cold-cli).
"""

from __future__ import annotations

import os
import threading

_started: threading.Thread | None = None


def _imports() -> None:
    try:
        import torch  # noqa: F401  (first: everything below needs it)
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel  # noqa: F401
        from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401

        if torch.cuda.is_available():
            # gsplat's JIT extension: a fresh process re-checks and loads the build on first use.
            from gsplat.cuda._backend import _C  # noqa: F401
    except BaseException:  # noqa: BLE001 — the main thread reports it
        pass


def start_model_imports() -> threading.Thread | None:
    """Begin importing diffusers and transformers in a daemon thread (once per process); returns
    the thread, or None when turned off."""
    global _started
    if os.environ.get("TDGEN_PREFETCH", "1") == "0":
        return None
    if _started is None:
        _started = threading.Thread(target=_imports, name="tdgen-prefetch", daemon=True)
        _started.start()
    return _started
