"""MHA -> GQA checkpoint conversion by mean-pooling K/V heads (Ainslie et al. 2023, arXiv 2305.13245).

``to_gqa(model, num_kv_heads)`` returns a new model whose K/V projections are the means of the
original heads within each group: query head ``h`` reads KV head ``h // (H_q / H_kv)`` (the
``repeat_kv`` convention), so old KV heads ``[i * r, (i + 1) * r)`` with ``r = H_kv_old /
H_kv_new`` pool into new KV head ``i``. The paper uplearns the converted checkpoint briefly
afterwards; this function only does the conversion.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from memfusion.errors import InvalidInput, UnsupportedModel

#: Model classes whose attention has separate ``k_proj`` / ``v_proj`` and a GQA-capable config.
GQA_CONVERTIBLE = (
    "LlamaForCausalLM",
    "LlamaModel",
    "MistralForCausalLM",
    "MistralModel",
    "Qwen2ForCausalLM",
    "Qwen2Model",
)


def _pool(linear: nn.Linear, old_kv: int, new_kv: int, head_dim: int) -> nn.Linear:
    """A Linear whose output heads are the means of ``old_kv // new_kv`` consecutive heads."""
    r = old_kv // new_kv
    w = linear.weight.detach()  # (old_kv * D, hidden)
    hidden = w.shape[1]
    pooled = nn.Linear(hidden, new_kv * head_dim, bias=linear.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        mean_w = w.view(new_kv, r, head_dim, hidden).float().mean(dim=1)  # (new_kv, D, hidden)
        pooled.weight.copy_(mean_w.reshape(new_kv * head_dim, hidden))
        if linear.bias is not None:
            mean_b = linear.bias.detach().view(new_kv, r, head_dim).float().mean(dim=1)  # (new_kv, D)
            pooled.bias.copy_(mean_b.reshape(new_kv * head_dim))
    pooled.weight.requires_grad_(linear.weight.requires_grad)
    return pooled


def to_gqa(model: Any, num_kv_heads: int) -> Any:
    """A copy of ``model`` with ``num_kv_heads`` K/V heads (mean-pooled); ``model`` is not changed.

    Supported: the classes in :data:`GQA_CONVERTIBLE` (Llama, Mistral, Qwen2 and their base
    models; weights and biases). ``num_kv_heads`` must divide ``num_attention_heads`` and the
    current number of KV heads, and not exceed it.
    """
    name = type(model).__name__
    if name not in GQA_CONVERTIBLE:
        raise UnsupportedModel(
            f"to_gqa does not support {name}: it needs separate k_proj/v_proj and a config with "
            f"num_key_value_heads; supported classes: {', '.join(GQA_CONVERTIBLE)} (GPT-2 and GPT-NeoX fuse "
            "Q/K/V and their transformers classes have no GQA)"
        )
    if not isinstance(num_kv_heads, int) or isinstance(num_kv_heads, bool) or num_kv_heads < 1:
        raise InvalidInput(f"num_kv_heads must be an integer >= 1, got {num_kv_heads!r}")
    cfg = model.config
    heads = int(cfg.num_attention_heads)
    old_kv = int(getattr(cfg, "num_key_value_heads", None) or heads)
    if num_kv_heads > old_kv:
        raise InvalidInput(
            f"num_kv_heads={num_kv_heads} exceeds the model's {old_kv} KV heads; pooling can only reduce them"
        )
    if heads % num_kv_heads or old_kv % num_kv_heads:
        raise InvalidInput(
            f"num_kv_heads={num_kv_heads} must divide num_attention_heads={heads} and the current "
            f"num_key_value_heads={old_kv}"
        )
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    new = copy.deepcopy(model)
    attns = [m for m in new.modules() if isinstance(getattr(m, "k_proj", None), nn.Linear)]
    if len(attns) != int(cfg.num_hidden_layers) or not all(isinstance(getattr(m, "v_proj", None), nn.Linear)
                                                            for m in attns):
        raise UnsupportedModel(
            f"{name}: expected {cfg.num_hidden_layers} attention modules with k_proj/v_proj Linear layers, "
            f"found {len(attns)}; the checkpoint's modules differ from transformers' {name}"
        )
    for attn in attns:
        attn.k_proj = _pool(attn.k_proj, old_kv, num_kv_heads, head_dim)
        attn.v_proj = _pool(attn.v_proj, old_kv, num_kv_heads, head_dim)
        if hasattr(attn, "num_key_value_groups"):
            attn.num_key_value_groups = heads // num_kv_heads
    for c in {id(c): c for c in [new.config, *(getattr(a, "config", None) for a in attns)] if c is not None}.values():
        c.num_key_value_heads = num_kv_heads
    return new
