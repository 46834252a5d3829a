"""memfusion: computational memory fusion.

Public names only; importing this package has no side effects (no transformers patching,
no model loading). ``Engine`` (:mod:`memfusion.engine`) and ``models`` load on first use, so
``import memfusion`` stays light. Sub-packages: :mod:`memfusion.kv` (internal KV-cache memory),
:mod:`memfusion.neural`, :mod:`memfusion.store`, :mod:`memfusion.router`, :mod:`memfusion.monitor`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from memfusion.store import open_store

if TYPE_CHECKING:
    from memfusion import models as models
    from memfusion.engine import Engine as Engine

__version__ = "0.1.0"

__all__ = ["Engine", "__version__", "models", "open_store"]


def __getattr__(name: str) -> Any:
    import importlib

    if name == "Engine":
        return importlib.import_module("memfusion.engine").Engine
    if name == "models":
        return importlib.import_module("memfusion.models")
    raise AttributeError(f"module 'memfusion' has no attribute {name!r}")
