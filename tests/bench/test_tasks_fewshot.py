"""Few-shot episodes, the procedural glyph alphabet and the Omniglot directory loader."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from memfusion.bench.tasks.fewshot import ClassSet, Episode, EpisodeConfig, Episodes, accuracy_by_instance
from memfusion.bench.tasks.glyphs import GlyphAlphabet, GlyphConfig, glyph_class_set, render_strokes
from memfusion.bench.tasks.omniglot import OmniglotSplit, load_omniglot
from memfusion.errors import InvalidInput

FIXTURE = Path(__file__).parent / "fixtures" / "omniglot"
SMALL = GlyphConfig(n_classes=40)


@pytest.fixture(scope="module")
def glyphs() -> ClassSet:
    return glyph_class_set(SMALL, instances=10)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- glyphs


def test_glyph_class_set_shapes_range_and_ink(glyphs: ClassSet) -> None:
    assert glyphs.images.shape == (400, 20, 20) and glyphs.images.dtype == np.float32
    assert glyphs.n_classes == 40 and glyphs.counts.tolist() == [10] * 40
    assert glyphs.labels.tolist() == sorted(glyphs.labels.tolist())
    assert glyphs.images.min() >= 0.0 and glyphs.images.max() <= 1.0
    ink = glyphs.images.reshape(400, -1).mean(1)
    assert ink.min() > 0.01 and ink.max() < 0.6, "every image has strokes and a background"


def test_glyphs_are_seeded() -> None:
    cfg = GlyphConfig(n_classes=12)
    a, b = glyph_class_set(cfg, 3, seed=4), glyph_class_set(cfg, 3, seed=4)
    assert np.array_equal(a.images, b.images)
    assert not np.array_equal(a.images, glyph_class_set(cfg, 3, seed=5).images)  # other instances
    other = GlyphAlphabet(GlyphConfig(n_classes=12, seed=1))
    assert not np.array_equal(GlyphAlphabet(cfg).controls, other.controls)  # another alphabet


def test_glyph_classes_are_distinct_and_instances_vary(glyphs: ClassSet) -> None:
    alphabet = GlyphAlphabet(SMALL)
    ink = alphabet.clean().reshape(40, -1) > 0.5
    for i in range(40):
        for j in range(i):
            assert (ink[i] != ink[j]).mean() >= SMALL.min_distance
    x = glyphs.images.reshape(40, 10, -1)
    for c in range(40):
        d = np.abs(x[c][:, None] - x[c][None]).sum(-1)  # (10, 10)
        assert d[~np.eye(10, dtype=bool)].min() > 0.0, "no two instances of a class are the same image"


def test_glyph_intra_class_distance_is_clearly_below_inter_class(glyphs: ClassSet) -> None:
    x = glyphs.images.reshape(40, 10, -1)
    intra = np.mean([np.abs(x[c][:, None] - x[c][None]).mean(-1).sum() / 90 for c in range(40)])
    inter = np.mean([np.abs(x[c][:, None] - x[d][None]).mean() for c in range(40) for d in range(40) if c != d])
    assert intra < 0.8 * inter


def test_glyphs_are_learnable_but_not_trivial(glyphs: ClassSet) -> None:
    """One-shot 5-way nearest neighbour on raw pixels: well above chance (0.2), below perfect."""
    x = glyphs.images.reshape(40, 10, -1)
    rng = np.random.default_rng(0)
    right = 0
    trials = 600
    for _ in range(trials):
        cl = rng.choice(40, 5, replace=False)
        pick = np.array([rng.permutation(10)[:2] for _ in cl])
        support, query = x[cl, pick[:, 0]], x[cl, pick[:, 1]]
        guess = ((query[:, None] - support[None]) ** 2).sum(-1).argmin(1)
        right += int((guess == np.arange(5)).sum())
    accuracy = right / (5 * trials)
    assert 0.65 < accuracy < 0.97


def test_render_strokes_matches_a_per_pixel_reference() -> None:
    """A straight stroke from (0.25, 0.5) to (0.75, 0.4), compared with a direct per-pixel loop."""
    size, width = 16, 0.1
    p0, p2 = np.array([0.25, 0.5]), np.array([0.75, 0.4])
    controls = np.zeros((1, 2, 3, 2), dtype=np.float32)
    controls[0, 0] = [p0, (p0 + p2) / 2, p2]
    strokes = np.array([[True, False]])
    got = render_strokes(controls, strokes, np.array([width]), size)[0]
    want = np.zeros((size, size))
    for row in range(size):
        for col in range(size):
            p = np.array([(col + 0.5) / size, (row + 0.5) / size])
            h = np.clip(np.dot(p - p0, p2 - p0) / np.dot(p2 - p0, p2 - p0), 0, 1)
            d = np.linalg.norm(p - (p0 + h * (p2 - p0)))
            want[row, col] = min(1.0, max(0.0, (width / 2 - d) * size + 0.5))
    np.testing.assert_allclose(got, want, atol=1e-5)


# ---------------------------------------------------------------- Omniglot


def test_omniglot_loader_reads_the_fixture() -> None:
    cs = load_omniglot(FIXTURE)
    assert cs.names == ("Tiny_Alpha/character01", "Tiny_Alpha/character02", "Tiny_Alpha/character03")
    assert cs.images.shape == (9, 20, 20) and cs.images.dtype == np.float32
    assert cs.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert cs.images.min() >= 0.0 and cs.images.max() <= 1.0
    both = load_omniglot(FIXTURE, OmniglotSplit.BOTH, size=28)
    assert both.n_classes == 6 and both.images.shape == (18, 28, 28)
    assert both.names[3:] == ("Tiny_Beta/character01", "Tiny_Beta/character02", "Tiny_Beta/character03")
    assert load_omniglot(FIXTURE, OmniglotSplit.EVALUATION).names == both.names[3:]


def test_omniglot_images_are_inverted_and_keep_their_ink() -> None:
    from PIL import Image

    cs = load_omniglot(FIXTURE, size=21)  # 105 = 5 * 21: an exact box filter
    png = FIXTURE / "images_background" / "Tiny_Alpha" / "character02" / "0102_01.png"
    with Image.open(png) as im:
        full = 1.0 - np.asarray(im.convert("L"), dtype=np.float64) / 255.0  # (105, 105), ink = 1
    assert full.shape == (105, 105)
    want = full.reshape(21, 5, 21, 5).mean(axis=(1, 3))  # 5x5 block means
    np.testing.assert_allclose(cs.images[3], want, atol=1e-2)
    assert 0.01 < cs.images[3].mean() < 0.5


def copy_fixture(tmp_path: Path) -> Path:
    root = tmp_path / "omniglot"
    shutil.copytree(FIXTURE, root)
    return root


def test_omniglot_errors(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="does not exist"):
        load_omniglot(tmp_path / "missing")
    with pytest.raises(InvalidInput, match="images_background is missing"):
        load_omniglot(tmp_path)  # an empty directory
    root = copy_fixture(tmp_path)
    shutil.rmtree(root / "images_evaluation")
    assert load_omniglot(root).n_classes == 3
    with pytest.raises(InvalidInput, match="images_evaluation is missing"):
        load_omniglot(root, OmniglotSplit.BOTH)
    (root / "images_evaluation").mkdir()
    with pytest.raises(InvalidInput, match="is empty"):
        load_omniglot(root, OmniglotSplit.EVALUATION)
    (root / "images_evaluation" / "Empty_Alphabet").mkdir()
    with pytest.raises(InvalidInput, match="no character folders"):
        load_omniglot(root, OmniglotSplit.EVALUATION)
    (root / "images_evaluation" / "Empty_Alphabet" / "character01").mkdir()
    (root / "images_evaluation" / "Empty_Alphabet" / "character01" / "notes.txt").write_text("x")
    with pytest.raises(InvalidInput, match="no PNG drawings"):
        load_omniglot(root, OmniglotSplit.EVALUATION)
    (root / "images_background" / "Tiny_Alpha" / "character01" / "0101_04.png").write_bytes(b"not a png")
    with pytest.raises(InvalidInput, match=r"0101_04\.png is not a readable PNG"):
        load_omniglot(root)
    with pytest.raises(InvalidInput, match="OmniglotSplit"):
        load_omniglot(FIXTURE, "background")  # type: ignore[arg-type]


def test_omniglot_ignores_hidden_files(tmp_path: Path) -> None:
    root = copy_fixture(tmp_path)
    (root / "images_background" / ".DS_Store").write_bytes(b"\0")
    (root / "images_background" / "Tiny_Alpha" / "character01" / ".DS_Store").write_bytes(b"\0")
    assert load_omniglot(root).images.shape == (9, 20, 20)


# ---------------------------------------------------------------- class sets


def test_class_set_split_is_disjoint_and_complete(glyphs: ClassSet) -> None:
    train, test = glyphs.split(30, seed=3)
    assert train.n_classes == 30 and test.n_classes == 10
    assert not set(train.names) & set(test.names) and set(train.names) | set(test.names) == set(glyphs.names)
    for part in (train, test):
        for c, name in enumerate(part.names):
            original = glyphs.names.index(name)
            assert np.array_equal(part.images[part.labels == c], glyphs.images[glyphs.labels == original])
    again, _ = glyphs.split(30, seed=3)
    assert again.names == train.names
    ordered, _ = glyphs.split(30, seed=None)
    assert ordered.names == glyphs.names[:30]


def test_class_set_from_arrays_sorts_and_validates() -> None:
    images = np.stack([np.full((4, 4), v, dtype=np.float32) for v in (0.1, 0.2, 0.3, 0.4)])
    cs = ClassSet.from_arrays(images, np.array([1, 0, 1, 0]), ["a", "b"])
    assert cs.labels.tolist() == [0, 0, 1, 1] and cs.images[:, 0, 0].tolist() == pytest.approx([0.2, 0.4, 0.1, 0.3])
    with pytest.raises(InvalidInput, match="sorted"):
        ClassSet(images, np.array([1, 0, 1, 0]), ("a", "b"))
    with pytest.raises(InvalidInput, match="cover every class"):
        ClassSet(images, np.array([0, 0, 0, 0]), ("a", "b"))
    with pytest.raises(InvalidInput, match=r"\[0, 1\]"):
        ClassSet(images * 5, np.array([0, 0, 1, 1]), ("a", "b"))
    with pytest.raises(InvalidInput, match="n_first"):
        cs.split(2)


# ---------------------------------------------------------------- episodes


def image_class(cs: ClassSet, flat: np.ndarray) -> set[int]:
    """The classes of the class-set images equal to ``flat`` (brute-force search)."""
    hits = np.nonzero((cs.images.reshape(len(cs.labels), -1) == flat).all(1))[0]
    return {int(cs.labels[i]) for i in hits}


@pytest.mark.parametrize(("n_way", "instances"), [(5, 10), (15, 4)])
def test_episode_structure(glyphs: ClassSet, n_way: int, instances: int) -> None:
    episodes = Episodes(glyphs, EpisodeConfig(n_way=n_way, instances=instances))
    e = episodes.batch(6, gen(0))
    t, p = n_way * instances, 400
    assert e.inputs.shape == (6, t, p + n_way) and e.targets.shape == (6, t, n_way)
    assert episodes.input_size == p + n_way and episodes.output_size == n_way
    assert e.mask.shape == (6, t) and bool((e.mask == 1).all())
    assert torch.equal(e.targets.argmax(-1), e.labels) and bool((e.targets.sum(-1) == 1).all())
    for b in range(6):
        # each label (class) is shown exactly `instances` times
        assert torch.bincount(e.labels[b], minlength=n_way).tolist() == [instances] * n_way
        # the label -> class map is a bijection onto distinct classes
        assert len(set(e.classes[b].tolist())) == n_way
        # the offset channel at t is the target at t - 1, zeros at t = 0
        assert float(e.inputs[b, 0, p:].abs().sum()) == 0.0
        assert torch.equal(e.inputs[b, 1:, p:], e.targets[b, :-1])
        # instance counts presentations so far, by a plain loop
        seen: dict[int, int] = {}
        for s in range(t):
            y = int(e.labels[b, s])
            seen[y] = seen.get(y, 0) + 1
            assert int(e.instance[b, s]) == seen[y]
        # each image is a drawing of the class its label stands for; a class's drawings are distinct
        drawn: dict[int, list[bytes]] = {}
        for s in range(t):
            flat = e.inputs[b, s, :p].numpy()
            y = int(e.labels[b, s])
            assert int(e.classes[b, y]) in image_class(glyphs, flat)
            drawn.setdefault(y, []).append(flat.tobytes())
        assert all(len(set(v)) == instances for v in drawn.values())


def test_labels_are_shuffled_per_episode() -> None:
    small = glyph_class_set(GlyphConfig(n_classes=6), instances=2)
    e = Episodes(small, EpisodeConfig(n_way=5, instances=2)).batch(200, gen(1))
    labels_of_class0 = {int((e.classes[b] == 0).nonzero()[0]) for b in range(200) if bool((e.classes[b] == 0).any())}
    assert labels_of_class0 == set(range(5))
    chosen = e.classes.sort(dim=1).values
    assert len({tuple(r) for r in chosen.tolist()}) > 1


def test_short_classes_cycle_through_their_drawings() -> None:
    cs = load_omniglot(FIXTURE)  # 3 drawings per character
    e = Episodes(cs, EpisodeConfig(n_way=3, instances=7)).batch(4, gen(2))
    for b in range(4):
        for y in range(3):
            steps = (e.labels[b] == y).nonzero().flatten().tolist()
            images = [e.inputs[b, s, :400].numpy().tobytes() for s in steps]
            assert len(images) == 7 and len(set(images)) == 3
            assert len(set(images[:3])) == 3, "the first three presentations are three distinct drawings"


def test_episodes_are_seeded(glyphs: ClassSet) -> None:
    episodes = Episodes(glyphs)
    a, b, c = episodes.batch(3, gen(7)), episodes.batch(3, gen(7)), episodes.batch(3, gen(8))
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.classes, b.classes)
    assert not torch.equal(a.inputs, c.inputs)


def test_accuracy_by_instance_on_a_hand_computed_case() -> None:
    labels = torch.tensor([[0, 1, 0, 1, 0, 1], [1, 1, 0, 0, 1, 0]])
    instance = torch.tensor([[1, 1, 2, 2, 3, 3], [1, 2, 1, 2, 3, 3]])
    onehot = torch.nn.functional.one_hot(labels, 2).float()
    e = Episode(torch.zeros(2, 6, 3), onehot, torch.ones(2, 6), labels, instance, torch.tensor([[4, 9], [9, 4]]))
    guess = torch.tensor([[1, 1, 0, 0, 0, 1], [0, 1, 0, 0, 1, 1]])
    logits = torch.nn.functional.one_hot(guess, 2).float()
    # instance 1: row0 t0 wrong, t1 right; row1 t0 wrong, t2 right -> 2/4
    # instance 2: row0 t2 right, t3 wrong; row1 t1 right, t3 right -> 3/4
    # instance 3: row0 t4 right, t5 right; row1 t4 right, t5 wrong -> 3/4
    assert accuracy_by_instance(logits, e, (1, 2, 3)) == {1: 0.5, 2: 0.75, 3: 0.75}
    with pytest.raises(InvalidInput, match=r"\[5, 10\]"):
        accuracy_by_instance(logits, e)
    with pytest.raises(InvalidInput, match="shape"):
        accuracy_by_instance(logits[:, :, :1], e, (1,))


def test_episode_bad_input(glyphs: ClassSet) -> None:
    tiny = load_omniglot(FIXTURE)
    with pytest.raises(InvalidInput, match="5-way episodes need at least 5 classes; the class set has 3"):
        Episodes(tiny)
    with pytest.raises(InvalidInput, match="n_way"):
        EpisodeConfig(n_way=1)
    with pytest.raises(InvalidInput, match="instances"):
        EpisodeConfig(instances=0)
    with pytest.raises(InvalidInput, match="batch_size"):
        Episodes(glyphs).batch(0, gen(0))
    with pytest.raises(InvalidInput, match="n_classes"):
        GlyphConfig(n_classes=0)
    with pytest.raises(InvalidInput, match="could only draw"):
        GlyphAlphabet(GlyphConfig(n_classes=50, grid=2, max_strokes=1, min_strokes=1), max_tries=3)
    with pytest.raises(InvalidInput, match="class indices"):
        GlyphAlphabet(GlyphConfig(n_classes=3)).render(np.array([3]), np.random.default_rng(0))


def test_a_pixel_nearest_neighbour_memory_meets_the_mann_targets() -> None:
    """The 5-way MANN targets (2nd instance >= 0.75, 10th >= 0.90) are reachable on the glyphs by a
    memory that stores every (image, label) pair and answers with the nearest stored image's label."""
    cs = glyph_class_set(GlyphConfig(n_classes=100), instances=20)
    e = Episodes(cs, EpisodeConfig(n_way=5, instances=10)).batch(128, gen(0))
    x = e.inputs[..., :400]  # (B, T, P)
    t = x.shape[1]
    d = torch.cdist(x, x).masked_fill(torch.ones(t, t, dtype=torch.bool).triu(), float("inf"))  # only the past
    guess = e.labels.gather(1, d[:, 1:].argmin(-1))  # (B, T - 1): the label of the nearest earlier image
    logits = torch.nn.functional.one_hot(torch.cat([torch.zeros_like(guess[:, :1]), guess], 1), 5).float()
    acc = accuracy_by_instance(logits, e, (2, 10))
    assert acc[2] >= 0.75 and acc[10] >= 0.9
