"""The reference model: a small Hugging Face causal LM trained by the project on its synthetic tasks.

``memfusion.models.reference.load()`` returns ``(model, tokenizer)`` from the shipped weights;
``memfusion.models.tokenizer`` builds its tokenizer (a fixed word-level vocabulary, one token per
digit tagged with its place in the number) and defines the fact-lookup format the engine uses to
put retrieved facts in context.
Submodules load ``tokenizers`` / ``transformers`` only when called; ``reference`` is imported on
first attribute access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from memfusion.models import reference as reference


def __getattr__(name: str) -> Any:
    import importlib

    if name in ("reference", "tokenizer", "reference_train"):
        return importlib.import_module(f"memfusion.models.{name}")
    raise AttributeError(f"module 'memfusion.models' has no attribute {name!r}")
