"""memfusion: computational memory fusion.

Public names only; importing this package has no side effects (no transformers patching,
no model loading). Sub-packages: :mod:`memfusion.kv` (internal KV-cache memory).
"""

from __future__ import annotations

from memfusion.store import open_store

__version__ = "0.1.0"

__all__ = ["__version__", "open_store"]
