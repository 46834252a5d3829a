"""The task runner of ``memfusion bench``: a suite's cells on one model, one JSON line per finished cell.

``DIR/results.jsonl`` invariants:

- line 1 is the header ``{"type": "header", "schema": SCHEMA_VERSION, ...}`` (memfusion version,
  suite, seed, model, device, batch, machine, library versions); every other line is one cell
  ``{"type": "cell", "key": ..., "status": "ok" | "failed", ...}``;
- lines are appended (and flushed) only when a cell has finished, so an interrupted run leaves a
  valid file; a truncated last line (a killed process) is ignored when read;
- a re-run with the same model, seed, device and batch skips the cells whose latest line is
  ``"ok"``; failed cells run again and their new line supersedes the old one;
- a file of another schema version, or made with another model / seed / device / batch, is
  refused with :class:`InvalidInput` (use a fresh ``--out``).

Models: ``"random"`` is a tiny random-weight Llama with the project tokenizer (for smoke / CI: its
accuracy is ~0 and the report says it is random); ``"reference"`` is the project's trained model
through ``memfusion.models.reference.load() -> (model, tokenizer)`` once that module exists; any
other value is a local Hugging Face checkpoint directory (``config.json``, weights, tokenizer).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import platform
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from memfusion.bench import metrics
from memfusion.bench.suites import BUDGET_PARAMS, Cell, Suite, known_policies, policy_params
from memfusion.errors import InvalidInput, NotFound

SCHEMA_VERSION = 1
"""Version of the results.jsonl layout; bump it when a field changes meaning."""
RESULTS_FILE = "results.jsonl"
RANDOM_MAX_POSITIONS = 16384
"""Context limit of the random smoke model (lengths beyond it are refused like any model's)."""

Progress = Callable[[str, int, int], None]
"""``progress(description, completed, total)``: called before each cell and once at the end."""


@dataclass(frozen=True)
class RunConfig:
    """One ``memfusion bench`` task run: ``suite`` on ``model`` into ``out`` (a directory)."""

    suite: Suite
    out: Path
    model: str = "random"
    device: str = "cpu"
    batch: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.batch, bool) or not isinstance(self.batch, int) or self.batch < 1:
            raise InvalidInput(f"batch must be an integer >= 1 (requests decoded together), got {self.batch!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise InvalidInput(f"seed must be an integer >= 0, got {self.seed!r}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise InvalidInput(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        if not self.model:
            raise InvalidInput("model must be 'random', 'reference' or the path of a local checkpoint directory")


@dataclass
class LoadedModel:
    """A causal LM and its tokenizer; ``max_positions`` is the model's context limit."""

    model: Any
    tokenizer: Any
    name: str
    random: bool
    max_positions: int
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunSummary:
    """What one call of :func:`run` did."""

    path: Path
    ran: int = 0
    failed: int = 0
    skipped: int = 0
    interrupted: bool = False
    report: dict[str, Path] = field(default_factory=dict)


# --- models -----------------------------------------------------------------------------------


def random_model(seed: int = 0, max_positions: int = RANDOM_MAX_POSITIONS) -> LoadedModel:
    """A tiny random-weight Llama (2 layers, 64 wide, GQA 4:2) with the project tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from memfusion.models.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(model_max_length=max_positions)
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(cfg).eval()
    info = {"architecture": "LlamaForCausalLM", "layers": 2, "hidden": 64, "parameters": _n_params(model)}
    return LoadedModel(model, tokenizer, "random", True, max_positions, info)


def _n_params(model: Any) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def _checkpoint(path: Path) -> LoadedModel:
    if not path.exists():
        raise NotFound(f"--model {path}: no such file or directory; give 'random', 'reference' or a checkpoint dir")
    if not path.is_dir() or not os.access(path, os.R_OK | os.X_OK):
        raise InvalidInput(f"--model {path}: not a readable directory; a Hugging Face checkpoint is a directory")
    if not (path / "config.json").is_file():
        raise InvalidInput(f"--model {path}: no config.json; expected a Hugging Face checkpoint (save_pretrained)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise InvalidInput(f"--model {path}: cannot load the checkpoint or its tokenizer: {exc}") from exc
    limit = getattr(model.config, "max_position_embeddings", None)
    if not isinstance(limit, int) or limit < 1:
        raise InvalidInput(f"--model {path}: its config has no max_position_embeddings (the context limit)")
    info = {"architecture": type(model).__name__, "parameters": _n_params(model)}
    return LoadedModel(model, tokenizer, str(path), False, limit, info)


def _reference() -> LoadedModel:
    if importlib.util.find_spec("memfusion.models.reference") is None:
        raise InvalidInput(
            "the reference model is not available in this version (memfusion.models.reference); "
            "use --model random or --model PATH (a local Hugging Face checkpoint)"
        )
    module = importlib.import_module("memfusion.models.reference")
    model, tokenizer = module.load()
    limit = int(model.config.max_position_embeddings)
    info = {"architecture": type(model).__name__, "parameters": _n_params(model)}
    return LoadedModel(model.eval(), tokenizer, "reference", False, limit, info)


def load_model(spec: str, device: str = "cpu", seed: int = 0) -> LoadedModel:
    """``"random"``, ``"reference"`` or a checkpoint directory, moved to ``device``, in eval mode."""
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidInput(f"device {device!r} asked for but CUDA is not available; use --device cpu")
    loaded = (
        random_model(seed) if spec == "random" else _reference() if spec == "reference" else _checkpoint(Path(spec))
    )
    loaded.model.to(device)
    if loaded.tokenizer.pad_token_id is None:
        loaded.tokenizer.pad_token = loaded.tokenizer.eos_token
    loaded.tokenizer.padding_side = "left"  # memfusion.kv.generate wants left padding
    return loaded


# --- the results file -----------------------------------------------------------------------


def results_path(path: str | Path) -> Path:
    """``path`` itself if it names a file, else ``path / results.jsonl``."""
    p = Path(path)
    return p if p.suffix == ".jsonl" else p / RESULTS_FILE


def read_results(path: str | Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The header and the latest line of every cell (by key, in file order) of a results file."""
    p = results_path(path)
    if not p.is_file():
        raise NotFound(f"no results at {p}: run `memfusion bench --out DIR` first")
    lines = p.read_text(encoding="utf-8").splitlines()
    records: list[dict[str, Any]] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if i == len(lines) - 1:  # a line cut short by a killed process: that cell did not finish
                break
            raise InvalidInput(f"{p}: line {i + 1} is not JSON ({exc}); the file is damaged") from exc
    if not records or records[0].get("type") != "header":
        raise InvalidInput(f"{p} is not a memfusion results file (its first line is not a header)")
    header = records[0]
    if header.get("schema") != SCHEMA_VERSION:
        raise InvalidInput(
            f"{p} has results schema {header.get('schema')!r} (memfusion {header.get('memfusion', '?')}); this "
            f"memfusion reads schema {SCHEMA_VERSION}: re-run the benchmark into a fresh --out directory"
        )
    cells = {r["key"]: r for r in records[1:] if r.get("type") == "cell"}
    return header, cells


def versions() -> dict[str, str]:
    import numpy
    import torch
    import transformers

    from memfusion import __version__

    return {
        "memfusion": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": numpy.__version__,
    }


def machine(device: str) -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(device)
    return out


SETTINGS = ("model", "seed", "device", "batch")
"""Header fields a resumed run must share with the file (they change every figure)."""


def _header(cfg: RunConfig, loaded: LoadedModel) -> dict[str, Any]:
    found = versions()
    return {
        "type": "header",
        "schema": SCHEMA_VERSION,
        "memfusion": found["memfusion"],
        "suite": asdict(cfg.suite),
        "seed": cfg.seed,
        "model": loaded.name,
        "model_random": loaded.random,
        "model_info": {**loaded.info, "max_positions": loaded.max_positions},
        "device": cfg.device,
        "batch": cfg.batch,
        "machine": machine(cfg.device),
        "versions": found,
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _append(path: Path, record: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


# --- one cell -------------------------------------------------------------------------------


@dataclass
class BatchResult:
    """One decoded batch (one request, in the latency sense): texts and figures."""

    texts: list[str]
    prefill_seconds: float
    decode_seconds: list[float]
    tokens: int
    stats: Any


def decode_batch(
    loaded: LoadedModel, prompts: Sequence[str], policy: str, params: dict[str, Any], new_tokens: int, chunk: int
) -> BatchResult:
    """Greedy decoding of ``prompts`` together with :func:`memfusion.kv.generate`."""
    import memfusion.kv as kv

    tok = loaded.tokenizer
    enc = tok(list(prompts), return_tensors="pt", padding=len(prompts) > 1)
    ids = enc["input_ids"]  # (B, T), left-padded
    mask = enc["attention_mask"] if len(prompts) > 1 else None
    res = kv.generate(
        loaded.model,
        ids,
        policy,
        attention_mask=mask,
        max_new_tokens=new_tokens,
        prefill_chunk=chunk,
        eos_token_id=tok.eos_token_id,
        **params,
    )
    new = res.sequences[:, ids.shape[1] :]  # (B, new)
    texts = [tok.decode(row.tolist(), skip_special_tokens=True) for row in new]
    return BatchResult(texts, res.prefill_seconds, list(res.decode_seconds), int(new.numel()), res.stats)


def _prefill_chunk(suite: Suite, policy: str, params: dict[str, Any]) -> int:
    """Bounded policies prefill in chunks no larger than their budget, so peak KV follows the budget."""
    if policy not in BUDGET_PARAMS:
        return suite.prefill_chunk
    budget = next(v for k, v in params.items() if k in ("window", "budget", "local", "token_budget"))
    return max(16, min(suite.prefill_chunk, int(budget)))


def run_cell(loaded: LoadedModel, cell: Cell, suite: Suite, seed: int, batch: int, device: str) -> dict[str, Any]:
    """Generate the cell's samples, decode them in batches, score them, and measure (an ``"ok"`` record)."""
    from memfusion.bench.tasks import get_task

    task = get_task(cell.task)
    params = policy_params(cell.policy, cell.length, cell.budget)
    chunk = _prefill_chunk(suite, cell.policy, params)
    samples = task.generate(loaded.tokenizer, cell.length, suite.samples, seed=seed)
    metrics.reset_cuda_peak(device)
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    batches: list[BatchResult] = []
    for s in range(0, len(samples), batch):
        group = samples[s : s + batch]
        out = decode_batch(loaded, [x.prompt for x in group], cell.policy, params, suite.new_tokens, chunk)
        batches.append(out)
        for j, (sample, text) in enumerate(zip(group, out.texts, strict=True)):
            rows.append(
                {
                    "i": s + j,
                    "score": task.score(sample, text),
                    "depth": sample.depth,
                    "distance": sample.distance,
                    "n_tokens": sample.n_tokens,
                    "has_needle": task.has_needle,
                    "answers": list(sample.answers),
                    "output": text,
                }
            )
    wall = time.perf_counter() - t0
    stats = [b.stats for b in batches]
    lat = metrics.latency([b.prefill_seconds for b in batches], [b.decode_seconds for b in batches])
    thr = metrics.throughput([b.tokens for b in batches], [b.prefill_seconds + sum(b.decode_seconds) for b in batches])
    decode_tokens = sum(len(b.decode_seconds) * len(b.texts) for b in batches)
    decode_time = sum(sum(b.decode_seconds) for b in batches)
    mem = metrics.kv_memory(stats)
    hits = metrics.hit_rate(sum(s.prefix_hits for s in stats), sum(s.prefix_lookups for s in stats))
    selected, total = sum(s.pages_selected for s in stats), sum(s.pages_total for s in stats)
    recalls = [s.extra["quest_recall"] for s in stats if "quest_recall" in s.extra]
    return {
        "type": "cell",
        "key": cell.key,
        "task": cell.task,
        "policy": cell.policy,
        "length": cell.length,
        "budget": cell.budget,
        "params": params,
        "prefill_chunk": chunk,
        "status": "ok",
        "error": None,
        "samples": rows,
        "metrics": {
            "accuracy": asdict(metrics.rate(r["score"] for r in rows)),
            "latency_ms": asdict(lat),
            "throughput": asdict(thr),
            "decode_tokens_per_s": decode_tokens / decode_time if decode_time > 0 else None,
            "kv": asdict(mem),
            "tokens_resident_max": max(s.tokens_resident for s in stats),
            "prefix_hit_rate": asdict(hits) if hits else None,
            "page_selection_ratio": selected / total if total else None,
            "page_recall": sum(recalls) / len(recalls) if recalls else None,
            "peak_rss_bytes": metrics.peak_rss_bytes(),
            "cuda_peak_bytes": metrics.cuda_peak_bytes(device),
        },
        "seconds": wall,
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _failed(cell: Cell, exc: BaseException, seconds: float) -> dict[str, Any]:
    return {
        "type": "cell",
        "key": cell.key,
        "task": cell.task,
        "policy": cell.policy,
        "length": cell.length,
        "budget": cell.budget,
        "status": "failed",
        "error": f"{type(exc).__name__}: {exc}",
        "traceback": traceback.format_exc(limit=-3),
        "seconds": seconds,
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
    }


# --- the run --------------------------------------------------------------------------------


def validate_names(suite: Suite) -> None:
    """Unknown task or policy names -> :class:`InvalidInput` listing the valid ones."""
    from memfusion.bench.tasks import TASKS
    from memfusion.kv import POLICIES

    bad_tasks = [t for t in suite.tasks if t not in TASKS]
    if bad_tasks:
        raise InvalidInput(f"unknown tasks {bad_tasks}; valid tasks: {', '.join(sorted(TASKS))}")
    valid = [p for p in known_policies() if p in POLICIES]
    bad = [p for p in suite.policies if p not in valid]
    if bad:
        raise InvalidInput(f"unknown policies {bad}; valid policies: {', '.join(valid)}")


def validate_lengths(suite: Suite, loaded: LoadedModel) -> None:
    """Every prompt plus its generated tokens must fit the model's context limit."""
    too_long = [n for n in suite.lengths if n * 1.02 + suite.new_tokens > loaded.max_positions]
    if too_long:
        raise InvalidInput(
            f"lengths {too_long} are beyond the model's limit: {loaded.name} has max_position_embeddings "
            f"{loaded.max_positions}, and a prompt (+2% tolerance) plus {suite.new_tokens} new tokens must fit; "
            f"use lengths <= {int((loaded.max_positions - suite.new_tokens) / 1.02)}"
        )


def run(
    cfg: RunConfig,
    *,
    progress: Progress | None = None,
    loader: Callable[[str, str, int], LoadedModel] = load_model,
    report: bool = True,
) -> RunSummary:
    """Run every unfinished cell of ``cfg.suite``, appending to ``cfg.out/results.jsonl``; then the report.

    A cell that raises is recorded as failed (its error and the last frames) and the run goes on.
    Ctrl-C (``KeyboardInterrupt``) stops after the finished cells; the report is still written
    and ``interrupted`` is set. Errors in the setup (names, lengths, model, results file) raise
    :class:`InvalidInput` / :class:`NotFound` before anything runs.
    """
    validate_names(cfg.suite)
    path = results_path(cfg.out)
    previous: dict[str, Any] | None = None
    done: dict[str, dict[str, Any]] = {}
    if path.exists():
        previous, done = read_results(path)
        for name in SETTINGS:
            if previous.get(name) != getattr(cfg, name):
                raise InvalidInput(
                    f"{path} holds results made with {name}={previous.get(name)!r}, this run has "
                    f"{name}={getattr(cfg, name)!r}: use another --out directory (or the same settings to resume)"
                )
    loaded = loader(cfg.model, cfg.device, cfg.seed)
    validate_lengths(cfg.suite, loaded)
    path.parent.mkdir(parents=True, exist_ok=True)
    if previous is None:
        _append(path, _header(cfg, loaded))
    summary = RunSummary(path)
    cells = cfg.suite.cells()
    try:
        for k, cell in enumerate(cells):
            if progress:
                progress(str(cell), k, len(cells))
            if done.get(cell.key, {}).get("status") == "ok":
                summary.skipped += 1
                continue
            t0 = time.perf_counter()
            try:
                record = run_cell(loaded, cell, cfg.suite, cfg.seed, cfg.batch, cfg.device)
            except Exception as exc:  # a crashed cell is a result too; the run goes on
                record = _failed(cell, exc, time.perf_counter() - t0)
                summary.failed += 1
            _append(path, record)
            summary.ran += 1
        if progress:
            progress("done", len(cells), len(cells))
    except KeyboardInterrupt:
        summary.interrupted = True
    if report:
        from memfusion.bench import taskreport

        summary.report = taskreport.build(path)
    return summary
