"""Omniglot (Lake et al. 2015) read from a local directory in its public layout, as a :class:`ClassSet`.

Layout: ``<root>/images_background/<Alphabet>/<characterNN>/<id>_<nn>.png`` and the same under
``images_evaluation`` (the two zips of the public release, unpacked side by side). Each character
directory is one class, named ``<Alphabet>/<characterNN>``. The PNGs are black strokes on white;
they are inverted (1 = ink, as the glyph generator draws), box-filtered down to ``size x size``
and returned as float32 in [0, 1]. Nothing is downloaded: a missing, empty or malformed tree is an
:class:`~memfusion.errors.InvalidInput` that names the offending path. Hidden files (``.DS_Store``)
and non-PNG files are ignored.
"""

from __future__ import annotations

import enum
from pathlib import Path

import numpy as np

from memfusion.bench.tasks.fewshot import ClassSet
from memfusion.errors import InvalidInput


class OmniglotSplit(enum.Enum):
    """Which of the two public halves to read: ``background`` (964 classes, the usual training
    half), ``evaluation`` (659 classes) or both."""

    BACKGROUND = "background"
    EVALUATION = "evaluation"
    BOTH = "both"

    @property
    def folders(self) -> tuple[str, ...]:
        if self is OmniglotSplit.BOTH:
            return ("images_background", "images_evaluation")
        return (f"images_{self.value}",)


def _visible_dirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _read_png(path: Path, size: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError  # Pillow comes with matplotlib; imported only when reading

    try:
        with Image.open(path) as im:
            gray = im.convert("L").resize((size, size), Image.Resampling.BOX)
    except (UnidentifiedImageError, OSError) as e:
        raise InvalidInput(f"{path} is not a readable PNG image: {e}") from None
    return 1.0 - np.asarray(gray, dtype=np.float32) / 255.0  # (size, size), ink = 1


def load_omniglot(root: str | Path, split: OmniglotSplit = OmniglotSplit.BACKGROUND, size: int = 20) -> ClassSet:
    """Every character of ``split`` under ``root`` as a class of a :class:`ClassSet` ((M, size, size) images).

    Classes are ordered by folder, alphabet and character name; images within a class by file name.
    """
    if not isinstance(split, OmniglotSplit):
        raise InvalidInput(f"split must be an OmniglotSplit, got {split!r}; valid: {[s.value for s in OmniglotSplit]}")
    if size < 1:
        raise InvalidInput(f"size must be >= 1 pixel, got {size}")
    base = Path(root)
    if not base.is_dir():
        raise InvalidInput(
            f"Omniglot directory {base} does not exist (expected {base}/images_background/<Alphabet>/...)"
        )
    images: list[np.ndarray] = []
    labels: list[int] = []
    names: list[str] = []
    for folder in split.folders:
        top = base / folder
        if not top.is_dir():
            raise InvalidInput(f"{top} is missing: an Omniglot root holds {' and '.join(split.folders)}")
        alphabets = _visible_dirs(top)
        if not alphabets:
            raise InvalidInput(f"{top} is empty: expected one folder per alphabet")
        for alphabet in alphabets:
            characters = _visible_dirs(alphabet)
            if not characters:
                raise InvalidInput(f"alphabet folder {alphabet} has no character folders")
            for character in characters:
                pngs = sorted(
                    p for p in character.iterdir() if p.suffix.lower() == ".png" and not p.name.startswith(".")
                )
                if not pngs:
                    raise InvalidInput(f"character folder {character} has no PNG drawings")
                label = len(names)
                names.append(f"{alphabet.name}/{character.name}")
                for png in pngs:
                    images.append(_read_png(png, size))
                    labels.append(label)
    return ClassSet(np.stack(images), np.asarray(labels, dtype=np.int64), tuple(names))
