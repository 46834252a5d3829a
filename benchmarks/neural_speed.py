"""Training-step speed of the batched NTM / DNC / MANN against naive per-sample versions, in one run.

    .venv/bin/python benchmarks/neural_speed.py                    # batch 32, copy of 20 x 8-bit vectors
    .venv/bin/python benchmarks/neural_speed.py --repeats 10 --naive-repeats 5 --threads 2

One training step = forward over the copy-task sequence (``2L + 1`` steps of ``bits + 1`` inputs),
BCE-with-logits loss, backward and an Adam step. The batched module and the naive version
(:mod:`memfusion.bench.naive_memories`: a Python loop over the batch as the reference repositories
do) start from the same parameters, on the same random batch. Reports the median time with
its min / max over the repeats and the ratio of the medians, measured in the same process.
"""

from __future__ import annotations

import argparse
import copy
import functools
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from memfusion.bench.naive_memories import naive_dnc_forward, naive_mann_forward, naive_ntm_forward
from memfusion.neural.base import SequenceMemory
from memfusion.neural.dnc import DNC, DNCConfig
from memfusion.neural.mann import MANN, MANNConfig
from memfusion.neural.ntm import NTM, NTMConfig

Forward = Callable[[SequenceMemory, Tensor], Tensor]


def _copy_batch(batch: int, length: int, bits: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """x (B, 2L + 1, bits + 1): L random vectors, a delimiter, L blanks; target (B, 2L + 1, bits)."""
    seq = torch.randint(0, 2, (batch, length, bits), generator=generator).float()  # (B, L, bits)
    x = torch.zeros(batch, 2 * length + 1, bits + 1)
    x[:, :length, :bits] = seq
    x[:, length, bits] = 1.0  # delimiter channel
    target = torch.zeros(batch, 2 * length + 1, bits)
    target[:, length + 1 :] = seq
    return x, target


def _batched_forward(model: SequenceMemory, x: Tensor) -> Tensor:
    return model(x)[0]


def _naive_forward(naive: Callable[..., tuple[Tensor, object]], model: SequenceMemory, x: Tensor) -> Tensor:
    return naive(model, x)[0]


def _time_steps(model: SequenceMemory, forward: Forward, x: Tensor, target: Tensor, repeats: int) -> list[float]:
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    loss_fn = nn.BCEWithLogitsLoss()
    times = []
    for i in range(repeats + 1):  # the first step warms up allocators and is not counted
        start = time.perf_counter()
        opt.zero_grad()
        loss = loss_fn(forward(model, x), target)
        loss.backward()
        opt.step()
        if i > 0:
            times.append(time.perf_counter() - start)
    return times


def _summary(times: list[float]) -> str:
    return f"median {statistics.median(times) * 1e3:9.1f} ms  [min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=20, help="copy-task sequence length L")
    parser.add_argument("--bits", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10, help="timed steps of the batched modules")
    parser.add_argument("--naive-repeats", type=int, default=3, help="timed steps of the naive versions")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--models", default="ntm,dnc,mann", help="comma-separated subset of ntm,dnc,mann")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    x, target = _copy_batch(args.batch, args.length, args.bits, gen)
    i, o = args.bits + 1, args.bits
    models: dict[str, tuple[SequenceMemory, Callable[..., tuple[Tensor, object]]]] = {
        "ntm": (NTM(NTMConfig(i, o)), naive_ntm_forward),
        "dnc": (DNC(DNCConfig(i, o)), naive_dnc_forward),
        "mann": (MANN(MANNConfig(i, o)), naive_mann_forward),
    }
    print(
        f"# neural_speed: torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{args.threads} threads, python {platform.python_version()}"
    )
    print(
        f"# one training step (forward + backward + Adam), batch {args.batch}, copy of {args.length} x "
        f"{args.bits}-bit vectors ({2 * args.length + 1} steps); batched: {args.repeats} repeats, "
        f"naive: {args.naive_repeats} repeats"
    )
    for name in args.models.split(","):
        model, naive = models[name]
        naive_model = copy.deepcopy(model)
        batched = _time_steps(model, _batched_forward, x, target, args.repeats)
        looped = _time_steps(naive_model, functools.partial(_naive_forward, naive), x, target, args.naive_repeats)
        ratio = statistics.median(looped) / statistics.median(batched)
        print(f"{name.upper():5s} batched    {_summary(batched)}")
        print(f"{name.upper():5s} per-sample {_summary(looped)}")
        print(f"{name.upper():5s} speed-up   {ratio:.1f}x (ratio of medians)")


if __name__ == "__main__":
    main()
