"""Memory probes: behaviour against the kernel's own figures and a known allocation."""

from __future__ import annotations

import os
import resource
import sys

import pytest
import torch

from memfusion.monitor import cuda_peak_bytes, peak_rss_bytes, rss_bytes

MB = 1024 * 1024


def test_rss_is_positive_and_below_peak() -> None:
    now = rss_bytes()
    assert now > 0
    assert peak_rss_bytes() >= now


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss in KiB and /proc are Linux facts")
def test_linux_units_match_the_kernel() -> None:
    # ru_maxrss is KiB on Linux; /proc/self/status states VmHWM (the same high-water mark) in kB.
    # The probe may exceed it by the few pages the kernel's per-CPU counters had not folded in yet.
    kernel_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert kernel_peak <= peak_rss_bytes() <= kernel_peak + 4 * MB
    with open("/proc/self/status", encoding="ascii") as f:
        status = dict(line.split(":", 1) for line in f if ":" in line)
    vm_rss = int(status["VmRSS"].split()[0]) * 1024
    assert abs(rss_bytes() - vm_rss) <= 4 * MB  # two reads a moment apart, in different units


def test_rss_grows_by_a_touched_allocation() -> None:
    size = 64 * MB
    before = rss_bytes()
    buf = bytearray(size)  # zero pages may be mapped lazily: write one byte in every page
    page = os.sysconf("SC_PAGE_SIZE")
    buf[::page] = b"\x01" * len(range(0, size, page))
    after = rss_bytes()
    grown = after - before
    assert 0.75 * size <= grown <= 1.5 * size, grown / MB
    assert peak_rss_bytes() >= after
    del buf


def test_falls_back_to_peak_without_proc(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_open = builtins.open

    def no_proc(path: object, *args: object, **kwargs: object) -> object:
        if str(path).startswith("/proc/"):
            raise FileNotFoundError(path)
        return real_open(path, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(builtins, "open", no_proc)
    got = rss_bytes()
    monkeypatch.undo()
    assert got == pytest.approx(peak_rss_bytes(), abs=4 * MB)


def test_cuda_peak_is_none_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cuda_peak_bytes() is None
    assert cuda_peak_bytes("cuda:0") is None


def test_cuda_peak_is_none_for_a_cpu_device() -> None:
    assert cuda_peak_bytes("cpu") is None
    assert cuda_peak_bytes(torch.device("cpu")) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_peak_counts_an_allocation() -> None:
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    x = torch.empty(16 * MB, dtype=torch.uint8, device="cuda")
    assert cuda_peak_bytes() == torch.cuda.max_memory_allocated() >= base + 16 * MB
    assert cuda_peak_bytes("cuda") == cuda_peak_bytes(0) == cuda_peak_bytes()
    del x
