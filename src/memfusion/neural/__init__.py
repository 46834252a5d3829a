"""Differentiable external memories (torch.nn.Module), batched, CPU and GPU.

Each module takes its memory state in and returns it out explicitly; the addressing math lives in
:mod:`memfusion.neural.functional` as pure functions with documented shapes. Import the modules
from their files (``from memfusion.neural.ntm import NTM``); importing this package loads nothing.
"""
