"""The one adapter between memfusion KV policies and Hugging Face ``transformers``.

Nothing is patched at import time. :func:`attach` is a context manager that, for its duration
only, registers memfusion's attention and mask functions under :data:`ATTN_NAME`, switches the
model's ``_attn_implementation`` to it and binds the cache to the current context; on exit it
restores the model and unregisters the functions (reference-counted, so nested or concurrent
contexts on different models are safe).

Lower-level use, with your own ``model.generate`` or forward loop::

    cache = kv.make_cache(model, "window", window=256, sinks=4)
    with kv.attach(model, cache):
        out = model.generate(input_ids, **{kv.cache_kwarg(model): cache}, max_new_tokens=32)

(``cache=`` on transformers >= 5.24, ``past_key_values=`` before: :func:`cache_kwarg` says which.)
"""

from __future__ import annotations

import contextlib
import inspect
import threading
import time
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

import torch
from transformers.cache_utils import Cache
from transformers.masking_utils import AttentionMaskInterface
from transformers.modeling_utils import AttentionInterface

from memfusion.errors import InvalidInput, MemfusionError, UnsupportedModel
from memfusion.kv.policy import KVLayer, PolicyConfig
from memfusion.kv.spec import ModelSpec
from memfusion.kv.stats import KVStats

ATTN_NAME = "memfusion"

_ACTIVE: ContextVar[MemfusionCache | None] = ContextVar("memfusion_active_cache", default=None)
_REG_LOCK = threading.Lock()
_REG_COUNT = 0


class MemfusionCache(Cache):
    """A ``transformers.Cache`` whose layers are a policy's :class:`KVLayer` objects.

    Use it only inside :func:`attach` (``update`` refuses otherwise: without memfusion's
    attention function the model would attend to the new tokens alone, silently).
    """

    def __init__(self, config: PolicyConfig, spec: ModelSpec) -> None:
        self.config = config
        self.spec = spec
        layers: list[Any] = config.make_layers(spec)
        super().__init__(layers=layers)
        self.tokens_seen = 0
        self.peak_bytes = 0
        self._layer_bytes = [0] * spec.num_layers
        #: wall seconds of each layer's policy attention (store + select + attend) over decode
        #: steps (one new token per sequence); read by benchmarks as "the attention part".
        self.decode_attend_seconds = [0.0] * spec.num_layers
        #: the same per decode step: ``decode_attend_steps[layer][step]`` (for medians and spreads).
        self.decode_attend_steps: list[list[float]] = [[] for _ in range(spec.num_layers)]

    @property
    def kv_layers(self) -> list[KVLayer]:
        return self.layers  # type: ignore[return-value]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if _ACTIVE.get() is not self:
            raise MemfusionError(
                "this memfusion cache was used outside `memfusion.kv.attach(model, cache)`: wrap the "
                "forward / generate call in that context manager (or use memfusion.kv.generate)"
            )
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def observe_input_ids(self, input_ids: torch.Tensor) -> None:
        """Called before each forward with its token ids ``(B, Tq)`` (see :func:`attach`)."""
        for layer in self.kv_layers:
            layer.observe_input_ids(input_ids)

    def attend(
        self,
        layer_idx: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        valid: torch.Tensor | None,
        scaling: float,
    ) -> torch.Tensor:
        """Run layer ``layer_idx``'s policy; see :meth:`KVLayer.attend` for shapes."""
        b, tq = q.shape[0], q.shape[2]
        if k.shape[1] != self.spec.num_kv_heads or q.shape[1] != self.spec.num_heads:
            raise InvalidInput(
                f"layer {layer_idx}: got {q.shape[1]} query / {k.shape[1]} KV heads, the cache was built "
                f"for {self.spec.num_heads} / {self.spec.num_kv_heads}; build a new cache for this model"
            )
        # K and V are what the cache keeps; a non-finite query poisons this layer's output, which
        # the next layer's K/V (or generate's logits check, after the last layer) then catches.
        if not (torch.isfinite(k).all() and torch.isfinite(v).all()):
            raise InvalidInput(
                f"non-finite key/value states at layer {layer_idx}: the inputs or the model weights "
                "contain NaN or Inf; check inputs_embeds, the checkpoint and the dtype"
            )
        if valid is None:
            valid = torch.ones(b, tq, dtype=torch.bool, device=q.device)
        layer = self.kv_layers[layer_idx]
        t0 = time.perf_counter()
        out = layer.attend(q, k, v, valid, scaling)
        if tq == 1:
            spent = time.perf_counter() - t0
            self.decode_attend_seconds[layer_idx] += spent
            self.decode_attend_steps[layer_idx].append(spent)
        layer.seen += tq
        if layer_idx == 0:
            self.tokens_seen += int(valid.sum())
        others = sum(self._layer_bytes) - self._layer_bytes[layer_idx]
        self._layer_bytes[layer_idx] = layer.stats().bytes_resident
        inflight = max(layer.inflight_bytes or 0, self._layer_bytes[layer_idx])
        self.peak_bytes = max(self.peak_bytes, others + inflight)
        return out

    def stats(self) -> KVStats:
        """Exact figures now, summed over layers (see :class:`KVStats`)."""
        per_layer = [layer.stats() for layer in self.kv_layers]
        s = KVStats(policy=self.config.name, tokens_seen=self.tokens_seen, layers=per_layer)
        s.tokens_resident = max((ls.tokens_resident for ls in per_layer), default=0)
        s.bytes_resident = sum(ls.bytes_resident for ls in per_layer)
        s.bytes_allocated = sum(ls.bytes_allocated for ls in per_layer)
        s.bytes_offloaded = sum(ls.bytes_offloaded for ls in per_layer)
        s.peak_bytes = max(self.peak_bytes, s.bytes_resident)
        s.pages_selected = sum(ls.pages_selected for ls in per_layer)
        s.pages_total = sum(ls.pages_total for ls in per_layer)
        extra = getattr(self.config, "cache_stats", None)
        if extra is not None:
            extra(self, s)
        return s

    def reset(self) -> None:
        super().reset()
        self.tokens_seen = 0
        self.peak_bytes = 0
        self._layer_bytes = [0] * self.spec.num_layers
        self.decode_attend_seconds = [0.0] * self.spec.num_layers
        self.decode_attend_steps = [[] for _ in range(self.spec.num_layers)]


def cache_kwarg(model: Any) -> str:
    """The name under which ``model``'s forward takes the KV cache: ``"cache"`` (transformers >= 5.24,
    which warns on ``past_key_values`` and drops it in 5.40) or ``"past_key_values"`` (before)."""
    forward = getattr(model, "forward", None)
    try:
        names = inspect.signature(forward).parameters if forward is not None else {}
    except (TypeError, ValueError):  # a forward without a signature: the long-standing name
        names = {}
    return "cache" if "cache" in names else "past_key_values"


def _attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """memfusion's attention function (the ``AttentionInterface`` signature)."""
    cache = _ACTIVE.get()
    if cache is None:
        raise MemfusionError(
            "the model is switched to memfusion attention but no cache is bound: call it inside "
            "`memfusion.kv.attach(model, cache)` and pass it the cache (under the name kv.cache_kwarg(model) gives)"
        )
    layer_idx = int(getattr(module, "layer_idx", -1))
    if not 0 <= layer_idx < cache.spec.num_layers:
        raise UnsupportedModel(f"{type(module).__name__} has no usable layer_idx; memfusion cannot route it")
    window = kwargs.get("sliding_window")
    if window is not None and cache.kv_layers[layer_idx].seen + query.shape[2] > int(window):
        raise UnsupportedModel(
            f"{cache.spec.architecture} uses sliding-window attention (window={window}) and the context "
            "exceeds it; memfusion policies implement full attention. Set config.sliding_window=None "
            "(or use_sliding_window=False) if the checkpoint allows it, or keep contexts within the window"
        )
    if scaling is None:
        scaling = float(getattr(module, "head_dim", query.shape[-1])) ** -0.5
    return cache.attend(layer_idx, query, key, value, attention_mask, scaling), None


def _padding_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """memfusion's mask function: the new tokens' validity ``(B, Tq)`` bool, None without padding.

    Causality and what was kept are the policy's business; the cache already knows the
    validity of every token it stores.
    """
    if attention_mask is None:
        return None
    new = attention_mask[:, -q_length:].to(torch.bool)  # (B, Tq)
    if new.shape != (batch_size, q_length):
        raise InvalidInput(
            f"attention_mask must be (batch, past + new) = ({batch_size}, {kv_length}); got "
            f"{tuple(attention_mask.shape)}"
        )
    return None if bool(new.all()) else new


@contextlib.contextmanager
def _registered() -> Iterator[None]:
    global _REG_COUNT
    with _REG_LOCK:
        if _REG_COUNT == 0:
            AttentionInterface.register(ATTN_NAME, _attention)
            AttentionMaskInterface.register(ATTN_NAME, _padding_mask)
        _REG_COUNT += 1
    try:
        yield
    finally:
        with _REG_LOCK:
            _REG_COUNT -= 1
            if _REG_COUNT == 0:
                AttentionInterface._global_mapping.pop(ATTN_NAME, None)
                AttentionMaskInterface._global_mapping.pop(ATTN_NAME, None)


def _configs(model: Any) -> list[Any]:
    """The model's config and its sub-configs that carry an attention implementation."""
    cfgs = [model.config]
    for name in getattr(model.config, "sub_configs", {}) or {}:
        sub = getattr(model.config, name, None)
        if sub is not None:
            cfgs.append(sub)
    return cfgs


@contextlib.contextmanager
def attach(model: Any, cache: MemfusionCache) -> Iterator[MemfusionCache]:
    """Route ``model``'s attention through ``cache`` for the duration of the block."""
    if not isinstance(cache, MemfusionCache):
        raise InvalidInput(f"attach() needs a MemfusionCache (from memfusion.kv.make_cache), got {type(cache)}")
    ModelSpec.from_model(model)  # raises UnsupportedModel with the class named
    cfgs = _configs(model)
    with _registered():
        saved = [c._attn_implementation for c in cfgs]
        token = _ACTIVE.set(cache)
        hook = model.get_input_embeddings().register_forward_pre_hook(
            lambda _module, args: cache.observe_input_ids(args[0]) if args else None
        )
        try:
            for c in cfgs:
                c._attn_implementation = ATTN_NAME
            yield cache
        finally:
            hook.remove()
            for c, impl in zip(cfgs, saved, strict=True):
                c._attn_implementation = impl
            _ACTIVE.reset(token)


def make_cache(model: Any, policy: str | PolicyConfig = "dense", **params: Any) -> MemfusionCache:
    """Build the cache of ``policy`` (a name from ``POLICIES`` plus parameters, or a config)."""
    from memfusion.kv.registry import resolve

    config = resolve(policy, **params)
    return MemfusionCache(config, ModelSpec.from_model(model))
