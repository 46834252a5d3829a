"""KV statistics: what a policy keeps, exactly, and what it selected."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LayerStats:
    """One layer's figures.

    ``tokens_resident`` counts (sequence, token) entries held per KV head, summed over the batch
    (a pooled core token counts as one). ``bytes_resident`` is the exact payload held: K/V
    elements plus the policy's own per-token or per-page data (quantisation scales, page
    min/max keys, representative keys); index book-keeping (positions, block tables) is not
    counted. ``bytes_allocated`` is the capacity of the storage tensors (>= resident).
    ``bytes_offloaded`` is what a tiered policy keeps outside the resident tier.
    """

    layer: int
    tokens_resident: int = 0
    bytes_resident: int = 0
    bytes_allocated: int = 0
    bytes_offloaded: int = 0
    pages_selected: int = 0
    pages_total: int = 0


@dataclass
class KVStats:
    """The cache's figures after a run (``res.stats`` of :func:`memfusion.kv.generate`).

    - ``tokens_seen``: real (non-padding) tokens processed, summed over the batch;
    - ``tokens_resident``: the largest layer's ``tokens_resident``;
    - ``bytes_resident`` / ``bytes_allocated`` / ``bytes_offloaded``: summed over layers, now;
    - ``peak_bytes``: the largest total held at any layer's attention step, the new chunk in
      flight included (a bounded policy peaks at budget + one chunk, in one layer at a time);
    - ``pages_selected`` / ``pages_total``: pages attended / pages available, summed over steps,
      layers, sequences and KV heads of page-selecting policies: quest counts its decode steps
      (prefill is dense), tiered every step that had cold pages (prefill chunks included);
    - ``prefix_hits`` / ``prefix_lookups``: full pages found already stored (paged);
    - ``extra``: policy-specific figures (e.g. quest's oracle recall).
    """

    policy: str
    tokens_seen: int = 0
    tokens_resident: int = 0
    bytes_resident: int = 0
    bytes_allocated: int = 0
    bytes_offloaded: int = 0
    peak_bytes: int = 0
    pages_selected: int = 0
    pages_total: int = 0
    prefix_hits: int = 0
    prefix_lookups: int = 0
    extra: dict[str, float] = field(default_factory=dict)
    layers: list[LayerStats] = field(default_factory=list)

    @property
    def page_selection_ratio(self) -> float:
        return self.pages_selected / self.pages_total if self.pages_total else 1.0

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_lookups if self.prefix_lookups else 0.0
