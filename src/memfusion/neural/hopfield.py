"""Modern Hopfield networks as layers (Ramsauer et al. 2020, "Hopfield Networks is All You Need"), and a
classical binary Hopfield network (Hopfield 1982) to compare capacities.

The modern update of a state pattern ``xi`` against stored patterns ``Y`` is
``xi <- Y^T softmax(beta * Y xi)``; it converges in one step to a stored pattern when the patterns
are well separated, and stores exponentially many (in the dimension) patterns. As layers
(the ``hopfield-layers`` design, with explicit shapes and no import-time state):

- :class:`Hopfield`: stored patterns ``Y`` (B, N, stored_size), state patterns ``R`` (B, S, input_size)
  and an optional pattern projection (the values, default ``Y``) are all inputs; multi-head;
- :class:`HopfieldLayer`: the stored patterns and their values are learned parameters (a lookup layer);
- :class:`HopfieldPooling`: the state patterns are learned queries; pools a set (B, N, .) to (B, S, .);
- :class:`ClassicalHopfield`: ±1 patterns, Hebbian weights, synchronous or asynchronous sign updates.

All three modern layers share :func:`hopfield_associate`, the multi-head update and read in the
association space (``d_k`` per head). Masks are boolean with ``True`` = may associate; a state
pattern with no allowed stored pattern reads zeros (never NaN).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from memfusion.errors import InvalidInput


def _need(cond: bool, message: str) -> None:
    if not cond:
        raise InvalidInput(message)


def _masked_softmax(logits: Tensor, mask: Tensor | None) -> Tensor:
    """Softmax over the last dimension that never returns NaN or inf.

    Logits that overflowed to ±inf are clamped to the largest finite value (a saturated softmax, as
    intended by a huge ``beta``); masked entries get weight exactly 0; a row with every entry masked
    gets all-zero weights (and zero gradients) instead of NaN.
    """
    big = torch.finfo(logits.dtype).max
    logits = logits.clamp(-big, big)
    if mask is None:
        return torch.softmax(logits, dim=-1)
    logits = logits.masked_fill(~mask, -big)
    return torch.softmax(logits, dim=-1) * mask


def hopfield_associate(
    query: Tensor,
    keys: Tensor,
    values: Tensor,
    beta: float,
    update_steps: int = 0,
    update_tol: float | None = None,
    mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Multi-head modern Hopfield association: ``update_steps`` updates of the state, then one read.

    query ``xi``: (B, H, S, d_k) state patterns; keys ``K``: (B or 1, H, N, d_k) stored patterns;
    values ``V``: (B or 1, H, N, d_v); mask: boolean, broadcastable to (B, H, S, N), ``True`` = may
    associate. Each update is ``xi <- softmax(beta xi K^T) K`` (the Hopfield update in the
    association space, as ``hopfield_retrieve`` per head); it stops early once the largest change of
    an update is below ``update_tol``. The read is ``Z = softmax(beta xi K^T) V``.
    ``update_steps = 0`` is one association (transformer attention with scale ``beta``).

    Returns (Z (B, H, S, d_v), the final association weights (B, H, S, N)).
    """
    _need(beta > 0, f"beta must be > 0, got {beta}")
    _need(update_steps >= 0, f"update_steps must be >= 0, got {update_steps}")
    xi = query
    for _ in range(update_steps):
        weights = _masked_softmax(beta * (xi @ keys.transpose(-1, -2)), mask)  # (B, H, S, N)
        new = weights @ keys  # (B, H, S, d_k)
        done = update_tol is not None and float((new - xi).abs().max()) < update_tol
        xi = new
        if done:
            break
    weights = _masked_softmax(beta * (xi @ keys.transpose(-1, -2)), mask)  # (B, H, S, N)
    return weights @ values, weights  # (B, H, S, d_v), (B, H, S, N)


@dataclass
class AssociationConfig:
    """What every modern Hopfield layer shares.

    input_size: width of the state patterns ``R`` (and of the pooled set for :class:`HopfieldPooling`).
    num_heads: ``H`` independent associations, concatenated then projected to ``output_size``.
    hidden_size: ``d_k``, the per-head width of the association space (default ``input_size // num_heads``).
    value_size: ``d_v``, the per-head width of what is read (default ``hidden_size``).
    output_size: width of the output (default ``input_size``).
    beta: inverse temperature, > 0 (default ``1 / sqrt(hidden_size)``, the attention scale; large
      values make the retrieval of a single stored pattern sharper).
    update_steps: Hopfield updates of the state before the read (0 = a single association).
    update_tol: stop the updates early once the largest change is below this (None: always run all).
    normalize: LayerNorm on the input patterns before projecting them (as hopfield-layers by default).
    bias: biases in the projections.
    """

    input_size: int
    num_heads: int = 1
    hidden_size: int | None = None
    value_size: int | None = None
    output_size: int | None = None
    beta: float | None = None
    update_steps: int = 0
    update_tol: float | None = None
    normalize: bool = True
    bias: bool = True

    def __post_init__(self) -> None:
        _need(self.input_size >= 1, f"input_size must be >= 1, got {self.input_size}")
        _need(self.num_heads >= 1, f"num_heads must be >= 1, got {self.num_heads}")
        if self.hidden_size is None:
            _need(
                self.input_size % self.num_heads == 0,
                f"input_size ({self.input_size}) must be divisible by num_heads ({self.num_heads}) "
                "unless hidden_size is given",
            )
        for name in ("hidden_size", "value_size", "output_size"):
            v = getattr(self, name)
            _need(v is None or v >= 1, f"{name} must be >= 1 (or None for the default), got {v}")
        _need(
            self.beta is None or (math.isfinite(self.beta) and self.beta > 0),
            f"beta must be a finite number > 0 (or None for 1/sqrt(hidden_size)), got {self.beta}",
        )
        _need(self.update_steps >= 0, f"update_steps must be >= 0, got {self.update_steps}")
        _need(
            self.update_tol is None or self.update_tol > 0,
            f"update_tol must be > 0 (or None), got {self.update_tol}",
        )

    @property
    def d_k(self) -> int:
        return self.hidden_size if self.hidden_size is not None else self.input_size // self.num_heads

    @property
    def d_v(self) -> int:
        return self.value_size if self.value_size is not None else self.d_k

    @property
    def out_size(self) -> int:
        return self.output_size if self.output_size is not None else self.input_size

    @property
    def scale(self) -> float:
        """The ``beta`` in use."""
        return self.beta if self.beta is not None else 1.0 / math.sqrt(self.d_k)


@dataclass
class HopfieldConfig(AssociationConfig):
    """A :class:`Hopfield` layer. stored_size: width of the stored patterns ``Y`` (default
    ``input_size``); projection_size: width of the pattern projection (the values; default ``stored_size``)."""

    stored_size: int | None = None
    projection_size: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("stored_size", "projection_size"):
            v = getattr(self, name)
            _need(v is None or v >= 1, f"{name} must be >= 1 (or None for the default), got {v}")

    @property
    def y_size(self) -> int:
        return self.stored_size if self.stored_size is not None else self.input_size

    @property
    def p_size(self) -> int:
        return self.projection_size if self.projection_size is not None else self.y_size


@dataclass
class HopfieldLayerConfig(AssociationConfig):
    """A :class:`HopfieldLayer`: ``num_patterns`` learned stored patterns (and their learned values)."""

    num_patterns: int = 16

    def __post_init__(self) -> None:
        super().__post_init__()
        _need(self.num_patterns >= 1, f"num_patterns must be >= 1, got {self.num_patterns}")


@dataclass
class HopfieldPoolingConfig(AssociationConfig):
    """A :class:`HopfieldPooling`: ``num_queries`` learned state patterns, so a set pools to (B, num_queries, .)."""

    num_queries: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        _need(self.num_queries >= 1, f"num_queries must be >= 1, got {self.num_queries}")


def _norm(enabled: bool, size: int) -> nn.Module:
    return nn.LayerNorm(size) if enabled else nn.Identity()


def _split_heads(x: Tensor, heads: int) -> Tensor:
    """(B, L, H * d) -> (B, H, L, d)."""
    b, length, hd = x.shape
    return x.view(b, length, heads, hd // heads).transpose(1, 2)  # (B, H, L, d)


def _merge_heads(x: Tensor) -> Tensor:
    """(B, H, L, d) -> (B, L, H * d)."""
    b, h, length, d = x.shape
    return x.transpose(1, 2).reshape(b, length, h * d)  # (B, L, H * d)


def _head_mask(mask: Tensor | None, b: int, s: int, n: int) -> Tensor | None:
    """A user mask (B, N) or (B, S, N) -> (B, 1, 1 or S, N) broadcastable over the heads."""
    if mask is None:
        return None
    _need(mask.dtype == torch.bool, f"mask must be a bool tensor (True = may associate), got {mask.dtype}")
    if mask.dim() == 2:
        _need(tuple(mask.shape) == (b, n), f"mask must be (B, N) = {(b, n)} or (B, S, N), got {tuple(mask.shape)}")
        return mask[:, None, None, :]  # (B, 1, 1, N)
    _need(
        mask.dim() == 3 and tuple(mask.shape) == (b, s, n),
        f"mask must be (B, N) = {(b, n)} or (B, S, N) = {(b, s, n)}, got {tuple(mask.shape)}",
    )
    return mask[:, None, :, :]  # (B, 1, S, N)


def _check_patterns(x: Tensor, name: str, width: int, batch: int | None = None, length: int | None = None) -> None:
    _need(x.dim() == 3, f"{name} must be (B, L, {width}), got shape {tuple(x.shape)}")
    _need(x.shape[-1] == width, f"{name} must have width {width}, got shape {tuple(x.shape)}")
    _need(batch is None or x.shape[0] == batch, f"{name} has batch {x.shape[0]}, expected {batch}")
    _need(length is None or x.shape[1] == length, f"{name} has {x.shape[1]} patterns, expected {length}")
    _need(x.is_floating_point(), f"{name} must be a floating-point tensor, got {x.dtype}")


class Hopfield(nn.Module):
    """The general modern Hopfield layer: associate state patterns with stored patterns, read values.

    ``Z = W_O concat_h softmax(beta xi_h K_h^T) V_h`` with ``xi_h = LN(R) W_Q^h`` (after
    ``update_steps`` Hopfield updates), ``K_h = LN(Y) W_K^h``, ``V_h = LN(P) W_V^h``; ``R`` state patterns
    (B, S, input_size), ``Y`` stored patterns (B, N, stored_size), ``P`` the pattern projection
    (B, N, projection_size), ``Y`` by default. With ``state`` omitted the stored patterns are also the
    state patterns (self-association). The module holds only parameters.
    """

    def __init__(self, config: HopfieldConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        h = c.num_heads
        self.norm_state = _norm(c.normalize, c.input_size)
        self.norm_stored = _norm(c.normalize, c.y_size)
        self.norm_projection = _norm(c.normalize, c.p_size)
        self.q_proj = nn.Linear(c.input_size, h * c.d_k, bias=c.bias)  # W_Q
        self.k_proj = nn.Linear(c.y_size, h * c.d_k, bias=c.bias)  # W_K
        self.v_proj = nn.Linear(c.p_size, h * c.d_v, bias=c.bias)  # W_V
        self.out_proj = nn.Linear(h * c.d_v, c.out_size, bias=c.bias)  # W_O

    def associations(
        self,
        stored: Tensor,
        state: Tensor | None = None,
        projection: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Returns (the output (B, S, output_size), the association weights (B, H, S, N))."""
        c = self.config
        _check_patterns(stored, "stored", c.y_size)
        b, n = stored.shape[0], stored.shape[1]
        _need(n > 0, "stored is empty (N = 0): give at least one stored pattern")
        if state is None:
            _need(
                c.y_size == c.input_size,
                f"state may be omitted only when stored_size == input_size, got {c.y_size} != {c.input_size}",
            )
            state = stored
        _check_patterns(state, "state", c.input_size, batch=b)
        if projection is None:
            _need(
                c.p_size == c.y_size,
                f"projection may be omitted only when projection_size == stored_size, got {c.p_size} != {c.y_size}",
            )
            projection = stored
        _check_patterns(projection, "projection", c.p_size, batch=b, length=n)
        s = state.shape[1]
        q = _split_heads(self.q_proj(self.norm_state(state)), c.num_heads)  # (B, H, S, d_k)
        k = _split_heads(self.k_proj(self.norm_stored(stored)), c.num_heads)  # (B, H, N, d_k)
        v = _split_heads(self.v_proj(self.norm_projection(projection)), c.num_heads)  # (B, H, N, d_v)
        z, weights = hopfield_associate(
            q, k, v, c.scale, c.update_steps, c.update_tol, _head_mask(mask, b, s, n)
        )  # (B, H, S, d_v), (B, H, S, N)
        return self.out_proj(_merge_heads(z)), weights  # (B, S, output_size)

    def forward(
        self,
        stored: Tensor,
        state: Tensor | None = None,
        projection: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        """stored (B, N, stored_size), state (B, S, input_size), projection (B, N, projection_size),
        mask (B, N) or (B, S, N) bool (True = may associate) -> (B, S, output_size)."""
        return self.associations(stored, state, projection, mask)[0]


class HopfieldLayer(nn.Module):
    """A lookup layer: the stored patterns and their values are learned parameters.

    ``Z = W_O concat_h softmax(beta xi_h K_h^T) V_h`` with ``xi_h = LN(R) W_Q^h`` from the input
    R (B, S, input_size), and ``K_h`` (num_patterns, d_k), ``V_h`` (num_patterns, d_v) learned directly
    in the association space (static patterns, as hopfield-layers' ``HopfieldLayer``); shared by the
    batch without copying.
    """

    def __init__(self, config: HopfieldLayerConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        h = c.num_heads
        self.norm_state = _norm(c.normalize, c.input_size)
        self.q_proj = nn.Linear(c.input_size, h * c.d_k, bias=c.bias)  # W_Q
        self.patterns = nn.Parameter(torch.randn(h, c.num_patterns, c.d_k) / math.sqrt(c.d_k))  # K
        self.values = nn.Parameter(torch.randn(h, c.num_patterns, c.d_v) / math.sqrt(c.d_v))  # V
        self.out_proj = nn.Linear(h * c.d_v, c.out_size, bias=c.bias)  # W_O

    def associations(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Returns (the output (B, S, output_size), the association weights (B, H, S, num_patterns))."""
        c = self.config
        _check_patterns(x, "input", c.input_size)
        q = _split_heads(self.q_proj(self.norm_state(x)), c.num_heads)  # (B, H, S, d_k)
        z, weights = hopfield_associate(
            q, self.patterns.unsqueeze(0), self.values.unsqueeze(0), c.scale, c.update_steps, c.update_tol
        )  # (B, H, S, d_v), (B, H, S, N)
        return self.out_proj(_merge_heads(z)), weights  # (B, S, output_size)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, S, input_size) -> (B, S, output_size)."""
        return self.associations(x)[0]


class HopfieldPooling(nn.Module):
    """Pools a set (B, N, input_size) to a fixed size (B, num_queries, output_size).

    The state patterns are ``num_queries`` learned queries in the association space (static, as
    hopfield-layers' ``HopfieldPooling``); the set is the stored patterns (and the pattern
    projection): ``K_h = LN(Y) W_K^h``, ``V_h = LN(Y) W_V^h``. A padding mask (B, N) (True = a real
    element) excludes padding; a set with no real element pools to ``W_O 0`` (the output bias).
    """

    def __init__(self, config: HopfieldPoolingConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        h = c.num_heads
        self.norm_stored = _norm(c.normalize, c.input_size)
        self.queries = nn.Parameter(torch.randn(h, c.num_queries, c.d_k) / math.sqrt(c.d_k))  # xi
        self.k_proj = nn.Linear(c.input_size, h * c.d_k, bias=c.bias)  # W_K
        self.v_proj = nn.Linear(c.input_size, h * c.d_v, bias=c.bias)  # W_V
        self.out_proj = nn.Linear(h * c.d_v, c.out_size, bias=c.bias)  # W_O

    def associations(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Returns (the pooled output (B, num_queries, output_size), the weights (B, H, num_queries, N))."""
        c = self.config
        _check_patterns(x, "input", c.input_size)
        b, n = x.shape[0], x.shape[1]
        _need(n > 0, "the input set is empty (N = 0): give at least one element")
        y = self.norm_stored(x)
        k = _split_heads(self.k_proj(y), c.num_heads)  # (B, H, N, d_k)
        v = _split_heads(self.v_proj(y), c.num_heads)  # (B, H, N, d_v)
        q = self.queries.unsqueeze(0).expand(b, -1, -1, -1)  # (B, H, S, d_k)
        hm = None
        if mask is not None:
            _need(mask.dim() == 2, f"mask must be (B, N) = {(b, n)} (True = a real element), got {tuple(mask.shape)}")
            hm = _head_mask(mask, b, c.num_queries, n)
        z, weights = hopfield_associate(q, k, v, c.scale, c.update_steps, c.update_tol, hm)  # (B, H, S, d_v)
        return self.out_proj(_merge_heads(z)), weights  # (B, S, output_size)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """x (B, N, input_size), mask (B, N) bool -> (B, num_queries, output_size)."""
        return self.associations(x, mask)[0]


@dataclass
class ClassicalHopfieldConfig:
    """A binary Hopfield network of ``size`` neurons (``D``).

    synchronous: update every neuron at once (``s <- sign(W s)``, may end in a 2-cycle) or one at a
      time in a random order per sweep (asynchronous: the energy never increases, so it converges).
    max_sweeps: the most sweeps (one sweep updates every neuron once) before giving up.
    """

    size: int
    synchronous: bool = True
    max_sweeps: int = 100

    def __post_init__(self) -> None:
        _need(self.size >= 1, f"size must be >= 1, got {self.size}")
        _need(self.max_sweeps >= 1, f"max_sweeps must be >= 1, got {self.max_sweeps}")


class ClassicalHopfield(nn.Module):
    """The classical Hopfield network: Hebbian weights ``W = (1/D) sum_mu x_mu x_mu^T`` with zero
    diagonal, sign updates ``s_i <- sign(sum_j W_ij s_j)`` (a zero field keeps ``s_i``).

    Its capacity is about ``0.14 D`` random patterns (Amit, Gutfreund & Sompolinsky 1985), against
    exponentially many for the modern update (:func:`memfusion.neural.functional.hopfield_retrieve`).
    The weights are the memory: :meth:`store` returns them and :meth:`forward` takes them; one weight
    matrix serves every probe of a batch (a single network). The module has no parameters.
    """

    def __init__(self, config: ClassicalHopfieldConfig) -> None:
        super().__init__()
        self.config = config

    def _check_binary(self, x: Tensor, name: str) -> None:
        d = self.config.size
        _need(x.dim() == 2 and x.shape[1] == d, f"{name} must be (count, {d}), got shape {tuple(x.shape)}")
        _need(x.shape[0] > 0, f"{name} is empty: give at least one")
        _need(bool((x.abs() == 1).all()), f"{name} must contain only -1 and +1")

    def store(self, patterns: Tensor) -> Tensor:
        """patterns (N, D) of ±1 -> the Hebbian weights W (D, D), symmetric with zero diagonal."""
        self._check_binary(patterns, "patterns")
        x = patterns.to(torch.get_default_dtype() if not patterns.is_floating_point() else patterns.dtype)
        w = x.T @ x / self.config.size  # (D, D)
        return w.fill_diagonal_(0.0)

    def forward(self, probes: Tensor, weights: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """probes (P, D) of ±1, weights (D, D) -> the states (P, D) after convergence or ``max_sweeps``.

        Asynchronous sweeps visit the neurons in an order drawn from ``generator`` (shared by all
        probes, so a batch equals its probes run one by one with the same generator seed).
        """
        d = self.config.size
        self._check_binary(probes, "probes")
        _need(tuple(weights.shape) == (d, d), f"weights must be ({d}, {d}), got {tuple(weights.shape)}")
        s = probes.to(weights.dtype).clone()
        for _ in range(self.config.max_sweeps):
            if self.config.synchronous:
                field = s @ weights  # (P, D); W is symmetric
                new = torch.where(field > 0, 1.0, torch.where(field < 0, -1.0, s))
                changed = bool((new != s).any())
                s = new
            else:
                changed = False
                order = torch.randperm(d, generator=generator, device="cpu").tolist()
                for i in order:
                    field = s @ weights[:, i]  # (P,)
                    new_i = torch.where(field > 0, 1.0, torch.where(field < 0, -1.0, s[:, i]))
                    changed = changed or bool((new_i != s[:, i]).any())
                    s[:, i] = new_i
            if not changed:
                break
        return s
