"""The reference model: a small Llama (GQA, RoPE) trained by the project on its synthetic tasks.

``load()`` reads the weights shipped with the package (``weights/``: ``config.json``,
``model.safetensors``, the tokenizer and ``training.json``, the record of the run that made them)
in about a second, with no training and no network::

    model, tokenizer = memfusion.models.reference.load()
    ids = tokenizer(prompt, return_tensors="pt").input_ids          # prompts end with "<v>"
    out = model.generate(ids, max_new_tokens=8)                      # the value, then "</s>"

``memfusion train reference`` (:mod:`memfusion.models.reference_train`) rebuilds them from a seed.
The architecture is :class:`ReferenceArch`; :func:`build` makes an untrained model of it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memfusion.errors import InvalidInput, NotFound

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

WEIGHTS_DIR = Path(__file__).with_name("weights")
"""Where the shipped weights live (inside the installed package)."""


@dataclass(frozen=True)
class ReferenceArch:
    """The model's shape. ``max_position``: ``max_position_embeddings``, the context limit that
    tasks and the bench check prompts against (training shows distances up to its longest
    :class:`~memfusion.models.reference_train.Stage`). ``head_dim``: the width of an attention head
    (Llama's ``head_dim``); ``None`` is ``hidden // heads``. Heads are wider than that by default: with
    4 heads of 64 on the 128-wide model the 128-token lookup stage reached loss 0.05 at step 610
    instead of 1,501 with heads of 32 (measured)."""

    layers: int = 4
    hidden: int = 128
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 384
    max_position: int = 16384
    rope_theta: float = 1_000_000.0  # slow rotations keep more dimensions for matching content far away
    head_dim: int | None = 64

    def __post_init__(self) -> None:
        sizes = (self.layers, self.hidden, self.heads, self.kv_heads, self.intermediate, self.max_position)
        if min(sizes) < 1 or (self.head_dim is not None and self.head_dim < 1):
            raise InvalidInput(f"every ReferenceArch size must be positive, got {self}")
        if (self.head_dim is None and self.hidden % self.heads) or self.heads % self.kv_heads:
            raise InvalidInput(
                f"hidden ({self.hidden}) must divide by heads ({self.heads}) unless head_dim is given, "
                f"and heads by kv_heads ({self.kv_heads})"
            )


def build(arch: ReferenceArch, vocab_size: int, pad_id: int, bos_id: int, eos_id: int) -> LlamaForCausalLM:
    """An untrained ``LlamaForCausalLM`` of shape ``arch`` (tied input / output embeddings)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=arch.hidden,
        intermediate_size=arch.intermediate,
        num_hidden_layers=arch.layers,
        num_attention_heads=arch.heads,
        num_key_value_heads=arch.kv_heads,
        head_dim=arch.head_dim if arch.head_dim is not None else arch.hidden // arch.heads,
        max_position_embeddings=arch.max_position,
        rope_parameters={"rope_type": "default", "rope_theta": arch.rope_theta},
        tie_word_embeddings=True,
        pad_token_id=pad_id,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
    )
    return LlamaForCausalLM(config)


def spread_digit_places(model: LlamaForCausalLM) -> LlamaForCausalLM:
    """Turn a model trained with bare digits (``build_tokenizer(digit_places=1)``) into one for the
    place-tagged tokenizer: the embedding grows by the tokens of places 1 and later (which come
    last in the vocabulary), each a copy of its digit's bare row, so the model first reads and writes
    every place as it did the bare digit, and training then tells the places apart. In place;
    returns ``model``."""
    from itertools import product

    import torch

    from memfusion.models.tokenizer import DIGIT_PLACES, DIGITS, digit_tag, vocabulary

    bare, full = vocabulary(1), vocabulary()
    rows = int(model.get_input_embeddings().weight.shape[0])  # type: ignore[index]
    if rows != len(bare):
        raise InvalidInput(
            f"the model has {rows} token embeddings; "
            f"spreading digit places needs the bare-digit vocabulary ({len(bare)})"
        )
    ids = {token: i for i, token in enumerate(full)}  # the bare tokens keep their ids
    model.zero_grad(set_to_none=True)
    model.resize_token_embeddings(len(full), mean_resizing=False)
    # a fresh Parameter: resizing swaps the table's data, and autograd keeps the old shape for a
    # parameter that went through a backward pass already
    embedding: Any = model.get_input_embeddings()
    weight = torch.nn.Parameter(embedding.weight.detach().clone())
    embedding.weight = weight
    model.lm_head.weight = weight  # tied
    with torch.no_grad():
        for place, d, space in product(range(1, DIGIT_PLACES), DIGITS, ("", " ")):
            weight[ids[space + digit_tag(place, d)]] = weight[ids[space + digit_tag(0, d)]]
    return model


def save(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, directory: Path, record: dict[str, Any]) -> Path:
    """Write a loadable checkpoint (``save_pretrained`` in float32 safetensors + tokenizer) and
    ``training.json`` (``record``) to ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory), safe_serialization=True)
    tokenizer.save_pretrained(str(directory))
    (directory / "training.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return directory


def load(path: str | Path | None = None) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """``(model, tokenizer)`` from ``path`` (default: the shipped weights), the model in eval mode on
    CPU in float32, the tokenizer left-padding (as ``memfusion.kv.generate`` wants)."""
    from transformers import LlamaForCausalLM

    from memfusion.models.tokenizer import load_tokenizer

    directory = WEIGHTS_DIR if path is None else Path(path)
    if not (directory / "model.safetensors").is_file():
        hint = "run `memfusion train reference` to build them" if path is None else "give a directory written by save()"
        raise NotFound(f"no reference weights at {directory} (model.safetensors missing); {hint}")
    model = LlamaForCausalLM.from_pretrained(str(directory), local_files_only=True)
    tokenizer = load_tokenizer(directory)
    tokenizer.padding_side = "left"
    return model.eval(), tokenizer


def training_record(path: str | Path | None = None) -> dict[str, Any]:
    """The ``training.json`` beside the weights: config, seed, steps, minutes, evaluation figures."""
    directory = WEIGHTS_DIR if path is None else Path(path)
    file = directory / "training.json"
    if not file.is_file():
        raise NotFound(f"no training record at {file}")
    data: dict[str, Any] = json.loads(file.read_text())
    return data


def arch_dict(arch: ReferenceArch) -> dict[str, Any]:
    """The arch as recorded in ``training.json``; ``head_dim`` only when set, so records written
    before it existed still match."""
    record = asdict(arch)
    if record["head_dim"] is None:
        del record["head_dim"]
    return record
