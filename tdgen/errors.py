"""Errors a user can act on.

Each carries an exit code and a message that names the problem *and* the fix, in one line. The CLI
prints `str(err)` in red and exits with `err.exit_code`; anything that is not a TdgenError is a bug
and keeps its traceback.
"""

from __future__ import annotations


class TdgenError(Exception):
    """Base class: a problem the user can fix. One line, with the fix in it."""

    exit_code: int = 1


class ConfigError(TdgenError):
    """Unknown preset/section/key, or a value of the wrong type."""

    exit_code = 2


class InputError(TdgenError):
    """A bad input file or argument (unreadable .ply, malformed prompt list, ...)."""

    exit_code = 2


class ModelNotFoundError(TdgenError):
    """The diffusion model is neither cached nor downloadable (offline, wrong id, bad folder)."""

    exit_code = 3


class ModelFormatError(TdgenError):
    """The model folder holds only pickled weights (.bin/.ckpt), which tdgen refuses to load."""

    exit_code = 3


class DeviceError(TdgenError):
    """The requested device is unusable (``--device cuda`` without CUDA, gsplat kernels fail)."""

    exit_code = 4


class GenerationError(TdgenError):
    """Generation failed at run time (NaN divergence, empty mesh, ...)."""

    exit_code = 1


class WriteError(TdgenError):
    """An output could not be written (disk full, read-only file system, no permission); the
    temp file is removed and any previous output is left as it was."""

    exit_code = 1


class BatchError(TdgenError):
    """At least one asset of a batch failed; the others were kept."""

    exit_code = 5
