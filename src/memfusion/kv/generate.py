"""``memfusion.kv.generate``: greedy generation under a KV policy, with chunked prefill."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from memfusion.errors import InvalidInput
from memfusion.kv.hf import MemfusionCache, attach, cache_kwarg, make_cache
from memfusion.kv.policy import PolicyConfig
from memfusion.kv.stats import KVStats


@dataclass
class GenerateResult:
    """``sequences (B, T + new)`` like ``model.generate``; ``logits (B, new, V)`` when asked.

    ``prefill_seconds`` covers the whole prompt; ``decode_seconds`` holds one wall time per
    decoded token (the forward that consumed it).
    """

    sequences: torch.Tensor
    stats: KVStats
    cache: MemfusionCache
    logits: torch.Tensor | None = None
    prefill_seconds: float = 0.0
    decode_seconds: list[float] = field(default_factory=list)


def _check_inputs(
    model: Any, input_ids: Any, attention_mask: Any, max_new_tokens: Any, prefill_chunk: Any
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if not isinstance(input_ids, torch.Tensor):
        raise InvalidInput(f"input_ids must be a torch.Tensor of token ids, got {type(input_ids).__name__}")
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise InvalidInput(f"input_ids must be (batch, length) with length >= 1, got {tuple(input_ids.shape)}")
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        if input_ids.dtype.is_floating_point and not torch.isfinite(input_ids).all():
            raise InvalidInput("input_ids contain NaN/Inf; they must be integer token ids")
        raise InvalidInput(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
    vocab = int(model.config.vocab_size)
    if int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab:
        raise InvalidInput(f"input_ids must lie in [0, {vocab}) (the model's vocab_size)")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InvalidInput(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if prefill_chunk is not None and (not isinstance(prefill_chunk, int) or prefill_chunk < 1):
        raise InvalidInput(f"prefill_chunk must be an integer >= 1 or None, got {prefill_chunk!r}")
    if attention_mask is None:
        return input_ids, None
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        shape = getattr(attention_mask, "shape", None)
        raise InvalidInput(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, got {shape}")
    if attention_mask.dtype.is_floating_point and not torch.isfinite(attention_mask).all():
        raise InvalidInput("attention_mask contains NaN/Inf; it must hold 0 (padding) and 1 (token)")
    if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise InvalidInput("attention_mask must hold only 0 (padding) and 1 (token)")
    mask = attention_mask.to(torch.bool)
    if not bool(mask.any(dim=1).all()):
        raise InvalidInput("every row of attention_mask needs at least one real token")
    if bool((mask[:, :-1] & ~mask[:, 1:]).any()):
        raise InvalidInput("padding must be on the left (tokenizer.padding_side = 'left') for generation")
    return input_ids, (None if bool(mask.all()) else mask)


@torch.inference_mode()
def generate(
    model: Any,
    input_ids: torch.Tensor,
    policy: str | PolicyConfig = "dense",
    *,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    prefill_chunk: int | None = 512,
    eos_token_id: int | None = None,
    output_logits: bool = False,
    **params: Any,
) -> GenerateResult:
    """Greedy decoding of ``model`` with the KV policy ``policy``.

    ``policy`` is a name of :data:`memfusion.kv.POLICIES` with its parameters as keywords
    (``policy="quest", token_budget=1024``) or a config instance. The prompt is prefilled in
    chunks of ``prefill_chunk`` tokens (None: at once), so a bounded policy's peak KV memory
    follows its budget (plus one chunk), not the prompt length. Rows that emit
    ``eos_token_id`` keep emitting it; generation stops when all rows have.
    """
    input_ids, mask = _check_inputs(model, input_ids, attention_mask, max_new_tokens, prefill_chunk)
    cache = make_cache(model, policy, **params)
    cache_name = cache_kwarg(model)
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    b, t = input_ids.shape
    chunk = prefill_chunk or t
    mask_buf = None
    if mask is not None:
        mask_buf = torch.ones(b, t + max_new_tokens, dtype=torch.long, device=device)  # (B, T + new)
        mask_buf[:, :t] = mask.to(device)
        positions = (mask_buf[:, :t].cumsum(dim=1) - 1).clamp_min(0)  # (B, T): index among real tokens
    else:
        positions = torch.arange(t, device=device).expand(b, t)

    def forward(ids: torch.Tensor, start: int, pos: torch.Tensor) -> torch.Tensor:
        end = start + ids.shape[1]
        am = None if mask_buf is None else mask_buf[:, :end]
        out = model(
            input_ids=ids,
            attention_mask=am,
            position_ids=pos,
            **{cache_name: cache},
            use_cache=True,
            logits_to_keep=1,
        )
        logits = out.logits[:, -1].float()  # (B, V)
        if not torch.isfinite(logits).all():
            raise InvalidInput(
                "the model produced non-finite logits: its weights or inputs contain NaN/Inf "
                "(or the dtype overflows); check the checkpoint and inputs_embeds"
            )
        return logits

    new_tokens: list[torch.Tensor] = []
    step_logits: list[torch.Tensor] = []
    decode_seconds: list[float] = []
    with attach(model, cache):
        t0 = time.perf_counter()
        for s in range(0, t, chunk):
            logits = forward(input_ids[:, s : s + chunk], s, positions[:, s : s + chunk])
        prefill_seconds = time.perf_counter() - t0
        next_pos = positions[:, -1:] + 1  # (B, 1)
        done = torch.zeros(b, dtype=torch.bool, device=device)
        for i in range(max_new_tokens):
            if output_logits:
                step_logits.append(logits)
            tok = logits.argmax(dim=-1)  # (B,)
            if eos_token_id is not None:
                tok = torch.where(done, torch.full_like(tok, eos_token_id), tok)
                done |= tok == eos_token_id
            new_tokens.append(tok)
            if i == max_new_tokens - 1 or (eos_token_id is not None and bool(done.all())):
                break
            t0 = time.perf_counter()
            logits = forward(tok.unsqueeze(1), t + i, next_pos)
            decode_seconds.append(time.perf_counter() - t0)
            next_pos = next_pos + 1
    sequences = torch.cat([input_ids, torch.stack(new_tokens, dim=1)], dim=1)
    return GenerateResult(
        sequences=sequences,
        stats=cache.stats(),
        cache=cache,
        logits=torch.stack(step_logits, dim=1) if output_logits else None,
        prefill_seconds=prefill_seconds,
        decode_seconds=decode_seconds,
    )
