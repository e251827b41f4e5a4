from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _v

try:
    __version__ = _v("puma-ray")
except PackageNotFoundError:  # a source tree that is not installed: pyproject.toml's version
    __version__ = "0.1.0"
