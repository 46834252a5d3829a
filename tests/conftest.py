"""Shared fixtures: tiny random-initialised models of every supported family (no downloads)."""

from __future__ import annotations

import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One thread: the test models are small, and small ops on 2 threads run several times slower
# than on 1 on a loaded 2-core machine (measured on the recurrent memories' tests).
torch.set_num_threads(1)
