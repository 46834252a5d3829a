"""Large CPU buffers on transparent huge pages, for kernels that read them in scattered small runs.

Quest reads 1 in 8 of its 16-token pages at each decode step, each K or V page 4 KiB at head dim
64 (fp32): one 4 KiB memory page, so each read starts with a TLB miss and a page walk. On 2 MiB
pages one TLB entry covers 512 of them (``benchmarks/kv_decode_breakdown.py --hugepages`` measures
the effect in the benchmark model). Contiguous readers (``dense``) gain nothing from it.

:func:`full` maps anonymous private memory, aligned to 2 MiB, and asks the kernel for huge pages
(``madvise(MADV_HUGEPAGE)``, which Linux honours when ``/sys/kernel/mm/transparent_hugepage/enabled``
is ``always`` or ``madvise``) before the first write, so the pages are faulted in huge. Elsewhere
(other systems, other devices, small buffers, or ``MEMFUSION_HUGEPAGES=0``) it is ``torch.full``.
"""

from __future__ import annotations

import contextlib
import mmap
import os

import numpy as np
import torch

HUGE = 2 << 20
"""The huge page size this asks for (x86-64 and most arm64 kernels): also the size below which
a buffer is allocated as usual."""


def enabled() -> bool:
    """Huge-page buffers are possible here and not switched off (``MEMFUSION_HUGEPAGES=0``)."""
    supported = all(hasattr(mmap, name) for name in ("MADV_HUGEPAGE", "MAP_PRIVATE", "MAP_ANONYMOUS"))
    return supported and os.environ.get("MEMFUSION_HUGEPAGES", "1") != "0"


def full(shape: tuple[int, ...], fill: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.full(shape, fill)``, on 2 MiB-aligned memory advised for huge pages where it is a CPU
    buffer of at least :data:`HUGE` bytes and :func:`enabled`. The tensor keeps its mapping alive
    (unmapped when the tensor is freed)."""
    count = int(np.prod(shape))
    size = count * dtype.itemsize
    if torch.device(device).type != "cpu" or size < HUGE or not enabled():
        return torch.full(shape, fill, dtype=dtype, device=device)
    region = mmap.mmap(-1, size + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    address = np.frombuffer(region, dtype=np.uint8, count=1).ctypes.data
    offset = -address % HUGE
    with contextlib.suppress(OSError):  # a kernel without transparent huge pages: ordinary pages, still aligned
        region.madvise(mmap.MADV_HUGEPAGE, offset, size)
    out = torch.frombuffer(region, dtype=dtype, count=count, offset=offset).view(shape)
    return out.fill_(fill)
