"""Shared settings and fixtures: one thread for torch, no hub downloads, the shipped reference model."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One thread: the test models are small, and small ops on 2 threads run several times slower
# than on 1 on a loaded 2-core machine (measured on the recurrent memories' tests).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def reference_model() -> Any:
    """``(model, tokenizer)`` of the weights shipped with the package, loaded once per session."""
    from memfusion.models.reference import load

    return load()
