"""A procedural alphabet of stroke-drawn glyphs: hundreds of character classes with no download.

A class *prototype* is a few strokes; each stroke is a quadratic Bézier curve whose three control
points lie on a ``grid x grid`` lattice over ``[margin, 1 - margin]^2`` of the unit square (a line
when the middle control point is the midpoint of the ends). An *instance* of a class is the
prototype with every control point jittered (Gaussian, ``jitter`` image widths), then rotated,
scaled and translated about the image centre, and drawn with a random stroke width: so instances
of one class share their topology but differ pixel-wise, like different people's drawings of a
character. Prototypes are drawn by rejection until every pair of classes differs on at least
``min_distance`` of the pixels of their clean renderings (distinct classes).

Rendering is vectorised numpy: each image pixel's distance to every segment of the sampled
strokes, then an anti-aliased ramp of one pixel: ``ink = clip((w / 2 - d) * size + 1/2, 0, 1)``.
Images are (size, size) float32 in [0, 1], 1 = ink (the Omniglot loader uses the same convention).
Everything is seeded: the alphabet by ``GlyphConfig.seed``, instances by the generator passed in.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from memfusion.bench.tasks.fewshot import ClassSet
from memfusion.errors import InvalidInput

_CHUNK = 256  # images rendered at once: bounds the (chunk, pixels, segments) distance array


def _need(cond: bool, message: str) -> None:
    if not cond:
        raise InvalidInput(message)


@dataclasses.dataclass(frozen=True)
class GlyphConfig:
    """The alphabet and its instance variation. Lengths are in image widths (the unit square)
    unless named otherwise; the defaults give 20x20 images whose classes a 1-nearest-neighbour
    on pixels separates well but not perfectly (see the tests)."""

    n_classes: int = 1200
    size: int = 20
    min_strokes: int = 2
    max_strokes: int = 4
    grid: int = 5
    margin: float = 0.2
    curve_prob: float = 0.5  # probability that a stroke bends (its middle control point is off the chord)
    jitter: float = 0.025  # std of each control point's displacement
    stroke_width: tuple[float, float] = (0.05, 0.09)
    rotation_deg: float = 10.0  # rotation drawn from [-rotation_deg, rotation_deg]
    scale: tuple[float, float] = (0.9, 1.1)
    shift: float = 0.05  # translation of each axis drawn from [-shift, shift]
    min_distance: float = 0.06  # fraction of pixels on which two clean prototypes must differ
    samples_per_stroke: int = 9  # points along each Bézier curve (segments = samples - 1)
    seed: int = 0

    def __post_init__(self) -> None:
        _need(self.n_classes >= 1, f"n_classes must be >= 1, got {self.n_classes}")
        _need(self.size >= 8, f"size must be >= 8 pixels, got {self.size}")
        _need(
            1 <= self.min_strokes <= self.max_strokes,
            f"need 1 <= min_strokes <= max_strokes, got {self.min_strokes}, {self.max_strokes}",
        )
        _need(self.grid >= 2, f"grid must be >= 2, got {self.grid}")
        _need(0.0 <= self.margin < 0.5, f"margin must lie in [0, 0.5), got {self.margin}")
        _need(0.0 <= self.curve_prob <= 1.0, f"curve_prob must lie in [0, 1], got {self.curve_prob}")
        _need(self.jitter >= 0.0 and self.shift >= 0.0, "jitter and shift must be >= 0")
        _need(0.0 < self.stroke_width[0] <= self.stroke_width[1], f"bad stroke_width range {self.stroke_width}")
        _need(0.0 < self.scale[0] <= self.scale[1], f"bad scale range {self.scale}")
        _need(0.0 <= self.rotation_deg <= 180.0, f"rotation_deg must lie in [0, 180], got {self.rotation_deg}")
        _need(0.0 <= self.min_distance < 1.0, f"min_distance must lie in [0, 1), got {self.min_distance}")
        _need(self.samples_per_stroke >= 2, f"samples_per_stroke must be >= 2, got {self.samples_per_stroke}")


def render_strokes(
    controls: np.ndarray, strokes: np.ndarray, widths: np.ndarray, size: int, samples: int = 9
) -> np.ndarray:
    """Draw quadratic Bézier strokes.

    controls: (M, S, 3, 2) control points (x, y) in the unit square (x right, y down); strokes:
    (M, S) bool, which strokes exist; widths: (M,) stroke widths in image widths. Returns
    (M, size, size) float32 in [0, 1].
    """
    m, s = strokes.shape
    t = np.linspace(0.0, 1.0, samples, dtype=np.float32)[:, None]  # (K, 1)
    p0, p1, p2 = (controls[:, :, i, None, :].astype(np.float32) for i in range(3))  # (M, S, 1, 2)
    pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2  # (M, S, K, 2)
    g = s * (samples - 1)
    a = pts[:, :, :-1].reshape(m, g, 2)  # (M, G, 2) segment starts
    ab = (pts[:, :, 1:] - pts[:, :, :-1]).reshape(m, g, 2)  # (M, G, 2) segment vectors
    inv_len2 = np.where(np.repeat(strokes, samples - 1, axis=1), 1.0 / np.maximum((ab * ab).sum(-1), 1e-12), 0.0)
    far = np.where(np.repeat(strokes, samples - 1, axis=1), 0.0, np.inf).astype(np.float32)  # (M, G) absent strokes
    centres = (np.arange(size, dtype=np.float32) + 0.5) / size  # pixel centres along one axis
    out = np.empty((m, size, size), dtype=np.float32)
    for lo in range(0, m, _CHUNK):
        sl = slice(lo, lo + _CHUNK)
        # x and y handled separately (no trailing axis of 2): rows are y, columns are x
        apx = (centres[None, None, :, None] - a[sl, None, None, :, 0]).astype(np.float32)  # (m, 1, W, G)
        apy = (centres[None, :, None, None] - a[sl, None, None, :, 1]).astype(np.float32)  # (m, H, 1, G)
        abx, aby = ab[sl, None, None, :, 0], ab[sl, None, None, :, 1]  # (m, 1, 1, G)
        h = (apx * abx + apy * aby) * inv_len2[sl, None, None, :].astype(np.float32)  # (m, H, W, G)
        np.clip(h, 0.0, 1.0, out=h)
        d2 = (apx - h * abx) ** 2 + (apy - h * aby) ** 2 + far[sl, None, None, :]  # (m, H, W, G)
        d = np.sqrt(d2.min(-1))  # (m, H, W) distance to the nearest stroke
        out[sl] = np.clip((widths[sl, None, None] / 2 - d) * size + 0.5, 0.0, 1.0)
    return out


class GlyphAlphabet:
    """The prototypes of ``config.n_classes`` distinct glyph classes, and a renderer of their instances.

    controls: (C, S, 3, 2) control points of each class's strokes; strokes: (C, S) bool (a class
    uses its first ``k`` strokes, ``min_strokes <= k <= max_strokes``). Invariant: the clean
    renderings of any two classes differ on at least ``config.min_distance`` of their pixels.
    """

    def __init__(self, config: GlyphConfig | None = None, max_tries: int = 100) -> None:
        self.config = cfg = config or GlyphConfig()
        rng = np.random.default_rng(cfg.seed)
        c, s, p = cfg.n_classes, cfg.max_strokes, cfg.size * cfg.size
        controls = np.zeros((c, s, 3, 2), dtype=np.float32)
        strokes = np.zeros((c, s), dtype=bool)
        clean = np.zeros((c, p), dtype=bool)  # the accepted prototypes' clean ink masks
        n = 0  # accepted so far
        for _ in range(max_tries):
            if n == c:
                break
            cand_c, cand_s = self._propose(rng, (c - n) + (c - n) // 2 + 8)
            mid = np.full(cand_c.shape[0], sum(cfg.stroke_width) / 2)
            ink = render_strokes(cand_c, cand_s, mid, cfg.size, cfg.samples_per_stroke).reshape(-1, p) > 0.5
            for i in range(cand_c.shape[0]):
                if n == c:
                    break
                if n and (clean[:n] != ink[i]).mean(axis=1).min() < cfg.min_distance:
                    continue
                controls[n], strokes[n], clean[n] = cand_c[i], cand_s[i], ink[i]
                n += 1
        _need(
            n == c,
            f"could only draw {n} glyph classes at least {cfg.min_distance} apart; "
            f"lower n_classes ({c}) or min_distance, or raise grid / max_strokes",
        )
        self.controls, self.strokes = controls, strokes

    def _propose(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``n`` candidate prototypes: (n, S, 3, 2) control points and (n, S) stroke flags."""
        cfg = self.config
        s = cfg.max_strokes
        lattice = np.linspace(cfg.margin, 1.0 - cfg.margin, cfg.grid)
        ends = rng.integers(0, cfg.grid, size=(n, s, 2, 2))  # (n, S, 2 ends, xy) lattice indices
        same = (ends[:, :, 0] == ends[:, :, 1]).all(-1)  # (n, S) a zero-length stroke: move its end
        ends[:, :, 1, 0] = np.where(
            same, (ends[:, :, 1, 0] + 1 + rng.integers(0, cfg.grid - 1, (n, s))) % cfg.grid, ends[:, :, 1, 0]
        )
        p0, p2 = lattice[ends[:, :, 0]], lattice[ends[:, :, 1]]  # (n, S, 2)
        bend = lattice[rng.integers(0, cfg.grid, size=(n, s, 2))]  # (n, S, 2) an off-chord middle point
        curved = rng.random((n, s)) < cfg.curve_prob
        p1 = np.where(curved[..., None], bend, (p0 + p2) / 2)
        controls = np.stack([p0, p1, p2], axis=2).astype(np.float32)  # (n, S, 3, 2)
        k = rng.integers(cfg.min_strokes, cfg.max_strokes + 1, size=n)
        strokes = np.arange(s)[None, :] < k[:, None]  # (n, S)
        return controls, strokes

    @property
    def n_classes(self) -> int:
        return int(self.controls.shape[0])

    def clean(self) -> np.ndarray:
        """(C, size, size): every class drawn without variation, at the middle stroke width."""
        cfg = self.config
        mid = np.full(self.n_classes, sum(cfg.stroke_width) / 2)
        return render_strokes(self.controls, self.strokes, mid, cfg.size, cfg.samples_per_stroke)

    def render(self, classes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """(M, size, size) float32: one fresh random instance of each class in ``classes`` (M,)."""
        cfg = self.config
        classes = np.asarray(classes, dtype=np.int64)
        _need(classes.ndim == 1, f"classes must be (M,), got shape {classes.shape}")
        _need(
            classes.size == 0 or (classes.min() >= 0 and classes.max() < self.n_classes),
            f"class indices must lie in [0, {self.n_classes})",
        )
        m = classes.shape[0]
        pts = self.controls[classes] + rng.normal(0.0, cfg.jitter, size=(m, cfg.max_strokes, 3, 2))  # (M, S, 3, 2)
        theta = np.deg2rad(rng.uniform(-cfg.rotation_deg, cfg.rotation_deg, size=m))
        scale = rng.uniform(cfg.scale[0], cfg.scale[1], size=m)
        cos, sin = np.cos(theta) * scale, np.sin(theta) * scale
        affine = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], axis=-2)  # (M, 2, 2)
        shift = rng.uniform(-cfg.shift, cfg.shift, size=(m, 1, 1, 2))
        pts = np.einsum("mij,msqj->msqi", affine, pts - 0.5) + 0.5 + shift  # (M, S, 3, 2)
        widths = rng.uniform(cfg.stroke_width[0], cfg.stroke_width[1], size=(m,))  # (M,)
        return render_strokes(pts, self.strokes[classes], widths, cfg.size, cfg.samples_per_stroke)

    def class_set(self, instances: int = 20, seed: int = 1) -> ClassSet:
        """A :class:`ClassSet` of ``instances`` rendered instances per class (Omniglot has 20)."""
        _need(instances >= 1, f"instances must be >= 1, got {instances}")
        labels = np.repeat(np.arange(self.n_classes), instances)
        images = self.render(labels, np.random.default_rng(seed))
        return ClassSet(images, labels, tuple(f"glyph{c:04d}" for c in range(self.n_classes)))


def glyph_class_set(config: GlyphConfig | None = None, instances: int = 20, seed: int = 1) -> ClassSet:
    """The glyph alphabet of ``config`` rendered as a class set (``instances`` per class)."""
    return GlyphAlphabet(config).class_set(instances, seed)
