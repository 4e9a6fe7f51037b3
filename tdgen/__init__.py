"""tdgen: game-ready 3D assets from text."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("tdgen")
except PackageNotFoundError:  # running from a checkout without installing
    __version__ = "0.1.0"
