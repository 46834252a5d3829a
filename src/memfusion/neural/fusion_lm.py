"""A small decoder-only transformer with segment-local attention and one memory-augmented layer.

The model reads a long sequence one segment of ``window`` tokens at a time. Every layer attends
causally *within* the segment only (:class:`~memfusion.neural.fusion.LocalAttention`), so without
memory no token sees anything of an earlier segment. With ``memory_layer = i`` the attention of
layer ``i`` is a :class:`~memfusion.neural.fusion.MemoryAugmentedAttention` whose external memory
(a :class:`~memfusion.neural.fusion.FusionMemory`) carries the (key, value) pairs of the earlier
segments from one ``forward`` to the next; ``memory_layer = None`` is the memory-less baseline.

Blocks are pre-norm (``x + attn(LN(x))``, ``x + MLP(LN(x))``, as GPT-2 / nanoGPT); positions are
learned (by position within the segment) or rotary (``attention.rotary``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from memfusion.errors import InvalidInput
from memfusion.neural.fusion import FusionConfig, FusionMemory, LocalAttention, MemoryAugmentedAttention


def _need(cond: bool, message: str) -> None:
    if not cond:
        raise InvalidInput(message)


@dataclass(frozen=True)
class FusionLMConfig:
    """The model. ``attention`` sets the width, heads and positions of every layer (its memory
    fields apply to layer ``memory_layer`` only). ``window``: tokens per segment, the reach of the
    local attention. ``d_ff``: MLP width, ``None`` means ``4 * d_model``."""

    vocab_size: int
    window: int = 32
    n_layers: int = 2
    memory_layer: int | None = 1
    attention: FusionConfig = field(default_factory=FusionConfig)
    d_ff: int | None = None

    def __post_init__(self) -> None:
        _need(self.vocab_size >= 2, f"vocab_size must be >= 2, got {self.vocab_size}")
        _need(self.window >= 1, f"window must be >= 1 token, got {self.window}")
        _need(self.n_layers >= 1, f"n_layers must be >= 1, got {self.n_layers}")
        _need(
            self.memory_layer is None or 0 <= self.memory_layer < self.n_layers,
            f"memory_layer must be None (no memory) or a layer index in [0, {self.n_layers - 1}], "
            f"got {self.memory_layer}",
        )
        _need(isinstance(self.attention, FusionConfig), f"attention must be a FusionConfig, got {self.attention!r}")
        _need(self.d_ff is None or self.d_ff >= 1, f"d_ff must be None or >= 1, got {self.d_ff}")

    @property
    def d_model(self) -> int:
        return self.attention.d_model


class _Block(nn.Module):
    """Pre-norm block; ``attn`` is local, or memory-augmented when ``memory`` is set."""

    def __init__(self, config: FusionLMConfig, memory: bool) -> None:
        super().__init__()
        c, a = config.d_model, config.attention
        self.ln1, self.ln2 = nn.LayerNorm(c), nn.LayerNorm(c)
        self.attn: LocalAttention | MemoryAugmentedAttention = (
            MemoryAugmentedAttention(a) if memory else LocalAttention(c, a.n_heads, a.rotary, a.rotary_base)
        )
        ff = config.d_ff or 4 * c
        self.mlp = nn.Sequential(nn.Linear(c, ff), nn.GELU(), nn.Linear(ff, c))

    def forward(self, x: Tensor, memory: FusionMemory | None) -> tuple[Tensor, FusionMemory | None]:
        h = self.ln1(x)
        if isinstance(self.attn, MemoryAugmentedAttention):
            a, memory = self.attn(h, memory)
        else:
            a = self.attn(h)
        x = x + a
        return x + self.mlp(self.ln2(x)), memory


class FusionLM(nn.Module):
    """``forward(ids (B, T), memory) -> (logits (B, T, V), memory')`` over one segment, T <= window.

    ``memory`` is the memory layer's :class:`FusionMemory` (``None``: empty); the baseline
    (``memory_layer = None``) takes and returns ``None``. Use :func:`run_segments` for sequences
    longer than one window.
    """

    def __init__(self, config: FusionLMConfig) -> None:
        super().__init__()
        self.config = config
        c = config.d_model
        self.tok = nn.Embedding(config.vocab_size, c)
        self.pos = None if config.attention.rotary else nn.Embedding(config.window, c)
        self.blocks = nn.ModuleList(_Block(config, i == config.memory_layer) for i in range(config.n_layers))
        self.ln_f = nn.LayerNorm(c)
        self.head = nn.Linear(c, config.vocab_size, bias=False)
        self.apply(_init)

    def forward(self, ids: Tensor, memory: FusionMemory | None = None) -> tuple[Tensor, FusionMemory | None]:
        cfg = self.config
        _need(
            ids.dim() == 2 and 1 <= ids.shape[1] <= cfg.window,
            f"ids must be (B, T) with 1 <= T <= window = {cfg.window}, got {tuple(ids.shape)}; "
            "split longer inputs with run_segments",
        )
        _need(ids.dtype in (torch.long, torch.int), f"ids must be integer token ids, got {ids.dtype}")
        _need(bool(((ids >= 0) & (ids < cfg.vocab_size)).all()), f"token ids must lie in [0, {cfg.vocab_size - 1}]")
        _need(
            cfg.memory_layer is not None or memory is None,
            "this model has no memory layer (memory_layer = None): pass memory=None",
        )
        x = self.tok(ids)  # (B, T, C)
        if self.pos is not None:
            x = x + self.pos(torch.arange(ids.shape[1], device=ids.device))  # (B, T, C)
        for block in self.blocks:
            x, memory = block(x, memory)
        return self.head(self.ln_f(x)), memory  # (B, T, V)


def _init(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Embedding):
        nn.init.normal_(m.weight, std=0.02)


def run_segments(
    model: FusionLM, ids: Tensor, memory: FusionMemory | None = None, *, grad_from: int = 0
) -> tuple[Tensor, FusionMemory | None]:
    """Run ids (B, L) segment by segment (``window`` tokens each, the last may be shorter),
    carrying the memory from each segment to the next. Returns (logits (B, L, V), final memory).

    ``grad_from``: segments before this index run without autograd (their pairs reach later
    segments only through the detached memory, so this changes no value and no gradient of a loss
    on the later segments; it saves their backward pass).
    """
    _need(ids.dim() == 2 and ids.shape[1] >= 1, f"ids must be (B, L) with L >= 1, got {tuple(ids.shape)}")
    w = model.config.window
    out = []
    for i, start in enumerate(range(0, ids.shape[1], w)):
        with torch.set_grad_enabled(torch.is_grad_enabled() and i >= grad_from):
            logits, memory = model(ids[:, start : start + w], memory)  # (B, <=W, V)
        out.append(logits)
    return torch.cat(out, dim=1), memory  # (B, L, V)


__all__ = ["FusionLM", "FusionLMConfig", "run_segments"]
