"""``quant``: KIVI-style asymmetric 2/4/8-bit KV quantisation with a full-precision residual.

KIVI (Liu et al., arXiv 2402.02750): keys have outlier *channels*, so a key scale covers one
channel over a group of ``group_size`` consecutive tokens; values are quantised per *token*
over groups of channels. The newest tokens stay in full precision (the residual) until a whole
group of them is old enough to be quantised.

Layout (per sequence and KV head; ``D`` head dim, ``gs = group_size``, ``b = bits``):

- a quantised group of ``gs`` tokens holds key codes and value codes packed into uint8 along
  ``D`` (``ceil(D * b / 8)`` bytes per token each: 4 codes a byte at 2 bits, 2 at 4, 1 at 8),
  a key scale and zero-point per channel (``2 * D`` numbers per group) and a value scale and
  zero-point per (token, channel group) (``2 * D / vg`` numbers per token); scales and zeros
  are in the model dtype;
- the value channel group is ``vg = min(group_size, D)``: clamped so the default
  ``group_size=32`` works for small heads, and it must divide ``D`` (checked at ``make_layer``);
- the residual holds the newest tokens as they came (full precision).

``bits=16`` switches quantisation off: the layer is the ``dense`` layer itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memfusion.kv.attention import grouped_attention, logit_mask, merge_partials, partial_attention
from memfusion.kv.policy import EvictingLayer, KVLayer, PolicyConfig, require, require_int
from memfusion.kv.spec import ModelSpec
from memfusion.kv.stats import LayerStats

BITS = (2, 4, 8, 16)
#: Tokens dequantised at once while attending (rounded to whole groups): the full-precision
#: working set of the quantised part never exceeds this, whatever the context length.
DEQUANT_TOKENS = 1024


# --- the arithmetic: pure functions -----------------------------------------------------------
def quantise(
    x: torch.Tensor, dim: int, bits: int, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min/max quantisation of ``x`` with one scale and zero-point per slice along ``dim``.

    ``mask`` (broadcastable to ``x``, True = counts) keeps padding out of the min/max.
    Returns ``codes`` (``x.shape``, uint8 in ``[0, 2**bits - 1]``) and ``scale``, ``zero``
    (``x.shape`` with ``dim`` of size 1, in ``x.dtype``); ``codes * scale + zero`` is within
    ``scale / 2`` of every counted element. A constant slice has scale 0 and is exact.
    """
    levels = (1 << bits) - 1
    xf = x.float()
    lo_src = xf if mask is None else torch.where(mask, xf, float("inf"))
    hi_src = xf if mask is None else torch.where(mask, xf, float("-inf"))
    lo = lo_src.amin(dim=dim, keepdim=True)
    hi = hi_src.amax(dim=dim, keepdim=True)
    empty = lo > hi  # every element masked
    lo = torch.where(empty, 0.0, lo)
    hi = torch.where(empty, 0.0, hi)
    scale = ((hi - lo) / levels).to(x.dtype)  # stored precision decides the codes
    zero = lo.to(x.dtype)
    sf, zf = scale.float(), zero.float()
    safe = torch.where(sf > 0, sf, torch.ones_like(sf))
    codes = ((xf - zf) / safe).round().clamp(0, levels).to(torch.uint8)
    return codes, scale, zero


def dequantise(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``codes * scale + zero`` in the dtype of ``scale`` (shapes broadcast)."""
    return codes.to(scale.dtype) * scale + zero


def packed_width(d: int, bits: int) -> int:
    """Bytes that ``d`` codes of ``bits`` bits occupy once packed."""
    return -(-d * bits // 8)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``codes (..., D)`` uint8 below ``2**bits`` -> ``(..., ceil(D * bits / 8))`` uint8.

    Code ``j`` of a byte sits at bits ``[j * bits, (j + 1) * bits)``; a short last byte is
    padded with zero codes.
    """
    per = 8 // bits
    if per == 1:
        return codes.to(torch.uint8)
    d = codes.shape[-1]
    pad = (-d) % per
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    c = codes.reshape(*codes.shape[:-1], -1, per).long()  # (..., Dp, per)
    shifts = torch.arange(per, device=codes.device) * bits  # (per,)
    return (c << shifts).sum(dim=-1).to(torch.uint8)  # (..., Dp)


def unpack(packed: torch.Tensor, bits: int, d: int) -> torch.Tensor:
    """Inverse of :func:`pack`: ``(..., Dp)`` uint8 -> ``(..., d)`` uint8 codes."""
    per = 8 // bits
    if per == 1:
        return packed
    shifts = torch.arange(per, device=packed.device, dtype=torch.uint8) * bits  # (per,)
    codes = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # (..., Dp, per)
    return codes.reshape(*packed.shape[:-1], -1)[..., :d]  # (..., d)


# --- the config --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Quant(PolicyConfig):
    """Keys and values quantised to ``bits`` (16 = off), the newest ``residual`` tokens exact.

    A residual that reaches ``residual + group_size`` tokens hands its oldest ``group_size``
    tokens to the quantised part (repeatedly, after each forward's attention), so after a step
    it holds between ``residual`` and ``residual + group_size - 1`` tokens (fewer at the
    start); within a step it also holds the chunk being processed.
    Memory grows with the context (at about ``bits / 16`` of dense per element plus scales),
    so the policy is not ``bounded``.
    """

    bits: int = 4
    group_size: int = 32
    residual: int = 128
    name = "quant"

    def __post_init__(self) -> None:
        require(
            isinstance(self.bits, int) and not isinstance(self.bits, bool) and self.bits in BITS,
            f"bits must be one of {', '.join(map(str, BITS))} (16 = no quantisation), got {self.bits!r}",
        )
        require_int(self.group_size, "group_size", 1)
        require_int(self.residual, "residual", 0)

    def value_group(self, head_dim: int) -> int:
        """Channels per value scale: ``min(group_size, head_dim)``; must divide ``head_dim``."""
        vg = min(self.group_size, head_dim)
        require(
            head_dim % vg == 0,
            f"group_size={self.group_size} must divide the model's head_dim={head_dim} (values are "
            f"quantised in groups of group_size channels) or be >= it; use a divisor of {head_dim}",
        )
        return vg

    def make_layer(self, layer_idx: int, spec: ModelSpec) -> KVLayer:
        if self.bits == 16:
            return EvictingLayer(layer_idx, spec)  # no quantisation: exactly dense
        return QuantLayer(layer_idx, spec, self)

    def quantised_tokens(self, seen: int) -> int:
        """Tokens held quantised after ``seen`` token slots (a multiple of ``group_size``)."""
        if self.bits == 16 or seen < self.residual + self.group_size:
            return 0
        return (seen - self.residual) // self.group_size * self.group_size

    def analytic_bytes(self, seen: int, spec: ModelSpec, batch: int = 1) -> int:
        """Packed codes + scales/zero-points + full-precision residual, all layers."""
        if self.bits == 16:
            return super().analytic_bytes(seen, spec, batch)
        d, e = spec.head_dim, spec.elem_bytes
        nq = self.quantised_tokens(seen)
        codes = 2 * nq * packed_width(d, self.bits)  # keys and values
        key_scales = (nq // self.group_size) * d * 2 * e  # scale + zero per (group, channel)
        value_scales = nq * (d // self.value_group(d)) * 2 * e  # per (token, channel group)
        residual = (seen - nq) * 2 * d * e
        return batch * spec.num_layers * spec.num_kv_heads * (codes + key_scales + value_scales + residual)


# --- the storage -------------------------------------------------------------------------------
class QuantBlocks:
    """The quantised part of one layer: whole groups of ``gs`` tokens, oldest first.

    Fields are tensors indexed ``(B, Hkv, group, ...)``: ``k``/``v`` packed codes
    ``(..., gs, Dp)`` uint8, ``k_scale``/``k_zero`` ``(..., D)`` (per channel of the group),
    ``v_scale``/``v_zero`` ``(..., gs, D // vg)`` (per token and channel group), and ``valid``
    ``(B, 1, group, gs)`` bool (False for padding, never attended).

    Invariants: groups ``[:n]`` hold tokens ``[n * gs)`` of the layer in arrival order (group
    ``i`` is token slots ``[i * gs, (i + 1) * gs)``); groups past ``n`` are garbage. Capacity
    grows by doubling (amortised O(1) per token).
    """

    def __init__(self, batch: int, spec: ModelSpec, cfg: Quant) -> None:
        self.batch, self.spec, self.cfg = batch, spec, cfg
        self.gs, self.bits, self.d = cfg.group_size, cfg.bits, spec.head_dim
        self.vg = cfg.value_group(self.d)
        self.n = 0
        self.fields: dict[str, torch.Tensor] = self._alloc(0)

    def _alloc(self, cap: int) -> dict[str, torch.Tensor]:
        b, h, gs, d, s = self.batch, self.spec.num_kv_heads, self.gs, self.d, self.spec
        dp, nvg = packed_width(d, self.bits), d // self.vg

        def codes(*shape: int) -> torch.Tensor:
            return torch.empty(*shape, dtype=torch.uint8, device=s.device)

        def real(*shape: int) -> torch.Tensor:
            return torch.empty(*shape, dtype=s.dtype, device=s.device)

        return {
            "k": codes(b, h, cap, gs, dp),
            "v": codes(b, h, cap, gs, dp),
            "k_scale": real(b, h, cap, d),
            "k_zero": real(b, h, cap, d),
            "v_scale": real(b, h, cap, gs, nvg),
            "v_zero": real(b, h, cap, gs, nvg),
            "valid": torch.zeros(b, 1, cap, gs, dtype=torch.bool, device=s.device),
        }

    def append(self, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor) -> None:
        """Quantise whole groups: ``k``/``v (B, Hkv, m * gs, D)``, ``valid (B, m * gs)``."""
        b, h, t, d = k.shape
        m, gs, vg = t // self.gs, self.gs, self.vg
        cap = self.fields["k"].shape[2]
        if self.n + m > cap:
            fresh = self._alloc(max(self.n + m, 2 * cap))
            for name, old in self.fields.items():
                fresh[name][:, :, : self.n] = old[:, :, : self.n]
            self.fields = fresh
        ok = valid.view(b, 1, m, gs)  # (B, 1, m, gs)
        kc, ks, kz = quantise(k.view(b, h, m, gs, d), 3, self.bits, ok.unsqueeze(-1))  # over the group's tokens
        vc, vs, vz = quantise(v.view(b, h, m, gs, d // vg, vg), 5, self.bits)  # over a token's channel group
        sl, f = slice(self.n, self.n + m), self.fields
        f["k"][:, :, sl] = pack(kc, self.bits)  # (B, Hkv, m, gs, Dp)
        f["v"][:, :, sl] = pack(vc.view(b, h, m, gs, d), self.bits)  # (B, Hkv, m, gs, Dp)
        f["k_scale"][:, :, sl] = ks.squeeze(3)  # (B, Hkv, m, D)
        f["k_zero"][:, :, sl] = kz.squeeze(3)
        f["v_scale"][:, :, sl] = vs.squeeze(5)  # (B, Hkv, m, gs, D // vg)
        f["v_zero"][:, :, sl] = vz.squeeze(5)
        f["valid"][:, :, sl] = ok
        self.n += m

    def dequantise(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Groups ``[start, stop)`` in full precision: ``k``, ``v (B, Hkv, N, D)``, ``valid (B, 1, N)``."""
        f, sl = self.fields, slice(start, stop)
        b, h, m, gs, d, vg = self.batch, self.spec.num_kv_heads, stop - start, self.gs, self.d, self.vg
        kc = unpack(f["k"][:, :, sl], self.bits, d)  # (B, Hkv, m, gs, D)
        k = dequantise(kc, f["k_scale"][:, :, sl].unsqueeze(3), f["k_zero"][:, :, sl].unsqueeze(3))
        vc = unpack(f["v"][:, :, sl], self.bits, d).view(b, h, m, gs, d // vg, vg)  # (B, Hkv, m, gs, D/vg, vg)
        v = dequantise(vc, f["v_scale"][:, :, sl].unsqueeze(-1), f["v_zero"][:, :, sl].unsqueeze(-1))
        valid = f["valid"][:, :, sl].reshape(b, 1, m * gs)  # (B, 1, N)
        return k.reshape(b, h, m * gs, d), v.reshape(b, h, m * gs, d), valid  # (B, Hkv, N, D)

    def payload_bytes(self) -> int:
        return sum(t[:, :, : self.n].numel() * t.element_size() for name, t in self.fields.items() if name != "valid")

    def allocated_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for name, t in self.fields.items() if name != "valid")


class QuantLayer(KVLayer):
    """Quantised groups (:class:`QuantBlocks`) followed by the full-precision residual.

    Invariants: the token slots of the layer, in arrival order, are the quantised groups then
    the residual ``res_k``/``res_v (B, Hkv, Nr, D)`` with ``res_valid (B, 1, Nr)``; after
    ``attend`` returns, ``Nr < residual + group_size``. Attention is exact softmax over the
    dequantised groups (``DEQUANT_TOKENS`` at a time) and the residual, merged by log-sum-exp.
    """

    def __init__(self, layer_idx: int, spec: ModelSpec, cfg: Quant) -> None:
        super().__init__(layer_idx, spec)
        self.cfg = cfg
        cfg.value_group(spec.head_dim)  # fail at cache construction, not at the first flush
        self.blocks: QuantBlocks | None = None
        self.res_k: torch.Tensor | None = None
        self.res_v: torch.Tensor | None = None
        self.res_valid: torch.Tensor | None = None
        self.dequant_groups = max(1, DEQUANT_TOKENS // cfg.group_size)

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, scaling: float
    ) -> torch.Tensor:
        b, tq = valid.shape
        if self.blocks is None or self.res_k is None or self.res_v is None or self.res_valid is None:
            self.blocks = QuantBlocks(b, self.spec, self.cfg)
            self.res_k, self.res_v, self.res_valid = k[:, :, :0], v[:, :, :0], valid[:, None, :0]
        self.res_k = torch.cat([self.res_k, k], dim=2)  # (B, Hkv, Nr, D)
        self.res_v = torch.cat([self.res_v, v], dim=2)
        self.res_valid = torch.cat([self.res_valid, valid.unsqueeze(1)], dim=2)  # (B, 1, Nr)
        if self.blocks.n == 0:
            out = grouped_attention(q, self.res_k, self.res_v, scaling, self.res_valid, causal_tail=tq)
        else:
            out = self._attend_parts(q, scaling)
        self._flush()
        return out

    def _attend_parts(self, q: torch.Tensor, scaling: float) -> torch.Tensor:
        assert self.blocks is not None and self.res_k is not None and self.res_v is not None
        assert self.res_valid is not None
        b, hq, tq, d = q.shape
        hkv = self.spec.num_kv_heads
        g = hq // hkv
        qg = q.reshape(b, hkv, g * tq, d)  # (B, Hkv, R, D): rows (query head in group, token)
        parts = []
        for start in range(0, self.blocks.n, self.dequant_groups):
            kb, vb, ok = self.blocks.dequantise(start, min(self.blocks.n, start + self.dequant_groups))
            mask = torch.where(ok, 0.0, float("-inf")).to(q.dtype)  # (B, 1, N)
            parts.append(partial_attention(qg, kb, vb, scaling, mask.unsqueeze(2)))  # mask (B, 1, 1, N)
        nr = self.res_k.shape[2]
        rmask = logit_mask(self.res_valid, None, tq, nr, tq, q.device, q.dtype)  # (B, 1, Tq, Nr)
        assert rmask is not None
        rmask = rmask.unsqueeze(2).expand(b, 1, g, tq, nr).reshape(b, 1, g * tq, nr)  # (B, 1, R, Nr)
        parts.append(partial_attention(qg, self.res_k, self.res_v, scaling, rmask))
        out = merge_partials(parts)  # (B, Hkv, R, D)
        return out.reshape(b, hq, tq, d).transpose(1, 2)  # (B, Tq, Hq, D)

    def _flush(self) -> None:
        """Quantise the residual's oldest whole groups beyond ``residual`` tokens."""
        assert self.blocks is not None and self.res_k is not None and self.res_v is not None
        assert self.res_valid is not None
        gs, nr = self.cfg.group_size, self.res_k.shape[2]
        if nr < self.cfg.residual + gs:
            return
        t = (nr - self.cfg.residual) // gs * gs
        self.blocks.append(self.res_k[:, :, :t], self.res_v[:, :, :t], self.res_valid[:, 0, :t])
        # clone: the kept tail must not pin the storage of the tokens just quantised
        self.res_k, self.res_v = self.res_k[:, :, t:].clone(), self.res_v[:, :, t:].clone()
        self.res_valid = self.res_valid[:, :, t:].clone()

    def stats(self) -> LayerStats:
        if self.blocks is None or self.res_k is None or self.res_v is None:
            return LayerStats(self.layer_idx)
        res = 2 * self.res_k.numel() * self.res_k.element_size()
        return LayerStats(
            self.layer_idx,
            tokens_resident=self.blocks.batch * (self.blocks.n * self.cfg.group_size + self.res_k.shape[2]),
            bytes_resident=self.blocks.payload_bytes() + res,
            bytes_allocated=self.blocks.allocated_bytes() + res,
        )

    def clear(self) -> None:
        self.blocks = None
        self.res_k = self.res_v = self.res_valid = None
