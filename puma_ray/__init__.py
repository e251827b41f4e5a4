"""Margin-based data pruning (PUMA) for adversarial training, on Ray.

The Python API is `puma_ray.api` (one function per command: `api.ingest`, `api.score`,
`api.prune`, `api.train`, `api.evaluate`, `api.run`, `api.sweep`, and `api.load` for a config);
it is imported on first use, so `import puma_ray` stays light (no torch, Ray or MLflow).
"""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _v

try:
    __version__ = _v("puma-ray")
except PackageNotFoundError:  # a source tree that is not installed: pyproject.toml's version
    __version__ = "0.1.0"

__all__ = ["__version__", "api"]


def __getattr__(name: str):
    # `puma_ray.api` after a plain `import puma_ray`, imported only then
    if name == "api":
        import importlib

        return importlib.import_module("puma_ray.api")
    raise AttributeError(f"module 'puma_ray' has no attribute {name!r}")
