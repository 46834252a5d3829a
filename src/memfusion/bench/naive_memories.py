"""Naive per-sample NTM, DNC and MANN, in the style of the reference repositories.

These run a given :class:`~memfusion.neural.ntm.NTM` / :class:`~memfusion.neural.dnc.DNC` /
:class:`~memfusion.neural.mann.MANN` instance's parameters **one sample at a time**, as
loudinthecloud/pytorch-ntm, ixaxaar/pytorch-dnc and tristandeleu/ntm-one-shot do: a Python loop over
the batch, 1-D vectors per sample, one head at a time, pytorch-ntm's padded ``conv1d`` for the
rotation, a per-sample ``sort`` + ``cumprod`` for the DNC allocation. The equations are written
again here from the papers and do not call :mod:`memfusion.neural.functional`, so they serve
as an independent reference in the tests (batched module == naive) and as the baseline of
``benchmarks/neural_speed.py``. They are differentiable, so a training step can be timed.

Epsilons are placed exactly as documented in :mod:`memfusion.neural.functional` (they are part of
the semantics: e.g. ``||k|| = sqrt(sum k^2 + eps^2)`` in the cosine), so outputs agree to rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from memfusion.neural.dnc import DNC
from memfusion.neural.mann import MANN
from memfusion.neural.ntm import NTM, Controller

EPS = 1e-6


def _cosine(key: Tensor, memory: Tensor) -> Tensor:
    """key (M,), memory (N, M) -> (N,)."""
    key_norm = torch.sqrt((key * key).sum() + EPS * EPS)
    row_norms = torch.sqrt((memory * memory).sum(dim=1) + EPS * EPS)
    return (memory @ key) / (key_norm * row_norms + EPS)


def _content(memory: Tensor, key: Tensor, beta: Tensor) -> Tensor:
    return F.softmax(beta * _cosine(key, memory), dim=0)


def _rotate(w: Tensor, s: Tensor) -> Tensor:
    """pytorch-ntm's circular convolution (for one sample), with offset +1 moving focus i -> i+1."""
    half = s.shape[0] // 2
    padded = torch.cat([w[w.shape[0] - half :], w, w[:half]]) if half else w
    return F.conv1d(padded.view(1, 1, -1), s.flip(0).view(1, 1, -1)).view(-1)


def _ntm_head(memory: Tensor, params: Tensor, prev: Tensor, m: int, s: int) -> Tensor:
    key = params[:m]
    beta = F.softplus(params[m])
    gate = torch.sigmoid(params[m + 1])
    shift = F.softmax(params[m + 2 : m + 2 + s], dim=0)
    gamma = 1 + F.softplus(params[m + 2 + s])
    wc = _content(memory, key, beta)
    wg = gate * wc + (1 - gate) * prev
    wr = _rotate(wg, shift)
    powered = (wr + EPS) ** gamma
    return powered / powered.sum()


def naive_ntm_forward(model: NTM, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Run ``model`` on x (B, T, I) sample by sample; returns y (B, T, O) and the final state fields stacked."""
    c = model.config
    m, s, n_read, n_write = c.memory_width, c.shift_range, c.read_heads, c.write_heads
    ys, finals = [], []
    for b in range(x.shape[0]):
        memory: Tensor = model.memory_init
        read_w = [F.softmax(model.read_weight_logits[i], dim=0) for i in range(n_read)]
        write_w = [F.softmax(model.write_weight_logits[i], dim=0) for i in range(n_write)]
        reads = [model.read_init[i] for i in range(n_read)]
        if c.controller is Controller.LSTM:
            h, cell = model.h0.view(1, -1), model.c0.view(1, -1)
        outs = []
        for t in range(x.shape[1]):
            inp = torch.cat([x[b, t], *reads]).view(1, -1)
            if c.controller is Controller.LSTM:
                h, cell = model.controller(inp, (h, cell))
            else:
                h = torch.tanh(model.controller(inp))
            hv = h.view(-1)
            wp = model.write_params(hv)
            per = 3 * m + s + 3
            write_w = [_ntm_head(memory, wp[i * per : (i + 1) * per], write_w[i], m, s) for i in range(n_write)]
            for i in range(n_write):
                erase = torch.sigmoid(wp[i * per + m + s + 3 : i * per + 2 * m + s + 3])
                memory = memory * (1 - torch.outer(write_w[i], erase))
            for i in range(n_write):
                add = wp[i * per + 2 * m + s + 3 : (i + 1) * per]
                memory = memory + torch.outer(write_w[i], add)
            rp = model.read_params(hv)
            per = m + s + 3
            read_w = [_ntm_head(memory, rp[i * per : (i + 1) * per], read_w[i], m, s) for i in range(n_read)]
            reads = [read_w[i] @ memory for i in range(n_read)]
            outs.append(model.output(torch.cat([hv, *reads])))
        ys.append(torch.stack(outs))
        finals.append({"memory": memory, "read_weights": torch.stack(read_w), "write_weights": torch.stack(write_w)})
    return torch.stack(ys), {k: torch.stack([f[k] for f in finals]) for k in finals[0]}


def _allocation(usage: Tensor) -> Tensor:
    """Per-sample DNC allocation: sort the slots by usage, exclusive cumprod, unsort."""
    u = EPS + (1 - EPS) * usage
    sorted_u, order = torch.sort(u, stable=True)
    before = torch.cumprod(torch.cat([u.new_ones(1), sorted_u[:-1]]), dim=0)
    alloc = torch.zeros_like(u)
    alloc[order] = (1 - sorted_u) * before
    return alloc


def naive_dnc_forward(model: DNC, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Run ``model`` on x (B, T, I) sample by sample; returns y (B, T, O) and the final state fields stacked."""
    c = model.config
    n, m, nr, nw, cs = c.memory_slots, c.memory_width, c.read_heads, c.write_heads, c.controller_size
    sizes = [nr * m, nr, nw * m, nw, nw * m, nw * m, nr, nw, nw, nr * (2 * nw + 1)]
    off_diagonal = 1 - torch.eye(n, dtype=x.dtype)
    ys, finals = [], []
    for b in range(x.shape[0]):
        memory = x.new_zeros(n, m)
        usage = x.new_zeros(n)
        link = [x.new_zeros(n, n) for _ in range(nw)]
        prec = [x.new_zeros(n) for _ in range(nw)]
        read_w = [x.new_zeros(n) for _ in range(nr)]
        write_w = [x.new_zeros(n) for _ in range(nw)]
        reads = [x.new_zeros(m) for _ in range(nr)]
        h, cell = x.new_zeros(1, cs), x.new_zeros(1, cs)
        outs = []
        for t in range(x.shape[1]):
            h, cell = model.controller(torch.cat([x[b, t], *reads]).view(1, -1), (h, cell))
            hv = h.view(-1)
            rk, rs, wk, ws, er, wv, fg, ag, wg, rm = model.interface(hv).split(sizes)
            # usage: write weights enter without gradient (deepmind/dnc)
            written = x.new_zeros(n)
            for i in range(nw):
                wd = write_w[i].detach()
                written = written + wd - written * wd
            usage = usage + written - usage * written
            for r in range(nr):
                usage = usage * (1 - torch.sigmoid(fg[r]) * read_w[r])
            # write weights, one head at a time
            u = usage
            new_write = []
            for i in range(nw):
                content = _content(memory, wk[i * m : (i + 1) * m], 1 + F.softplus(ws[i]))
                alloc = _allocation(u)
                g_a, g_w = torch.sigmoid(ag[i]), torch.sigmoid(wg[i])
                new_write.append(g_w * (g_a * alloc + (1 - g_a) * content))
                u = u + (1 - u) * g_w * g_a * alloc
            write_w = new_write
            for i in range(nw):
                memory = memory * (1 - torch.outer(write_w[i], torch.sigmoid(er[i * m : (i + 1) * m])))
            for i in range(nw):
                memory = memory + torch.outer(write_w[i], wv[i * m : (i + 1) * m])
            for i in range(nw):
                w = write_w[i]
                link[i] = ((1 - w.view(-1, 1) - w.view(1, -1)) * link[i] + torch.outer(w, prec[i])) * off_diagonal
                prec[i] = (1 - w.sum()) * prec[i] + w
            # reads
            new_read = []
            for r in range(nr):
                content = _content(memory, rk[r * m : (r + 1) * m], 1 + F.softplus(rs[r]))
                modes = F.softmax(rm[r * (2 * nw + 1) : (r + 1) * (2 * nw + 1)], dim=0)
                w = modes[2 * nw] * content
                for i in range(nw):
                    w = w + modes[i] * (link[i].t() @ read_w[r]) + modes[nw + i] * (link[i] @ read_w[r])
                if c.sparse_reads is not None:
                    top, idx = torch.topk(w, c.sparse_reads)
                    sparse = torch.zeros_like(w)
                    sparse[idx] = top / (top.sum() + EPS)
                    w = sparse
                new_read.append(w)
            read_w = new_read
            reads = [read_w[r] @ memory for r in range(nr)]
            outs.append(model.output(torch.cat([hv, *reads])))
        ys.append(torch.stack(outs))
        finals.append(
            {
                "memory": memory,
                "usage": usage,
                "link": torch.stack(link),
                "precedence": torch.stack(prec),
                "read_weights": torch.stack(read_w),
                "write_weights": torch.stack(write_w),
            }
        )
    return torch.stack(ys), {k: torch.stack([f[k] for f in finals]) for k in finals[0]}


def naive_mann_forward(model: MANN, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Run ``model`` on x (B, T, I) sample by sample; returns y (B, T, O) and the final state fields stacked."""
    c = model.config
    n, m, nr, cs = c.memory_slots, c.memory_width, c.read_heads, c.controller_size
    per = m + 1 + int(c.learn_key_strength)
    ys, finals = [], []
    for b in range(x.shape[0]):
        memory = x.new_full((n, m), 1e-6)
        usage = x.new_zeros(n)
        read_w = [x.new_zeros(n) for _ in range(nr)]
        reads = [x.new_zeros(m) for _ in range(nr)]
        h, cell = x.new_zeros(1, cs), x.new_zeros(1, cs)
        outs = []
        for t in range(x.shape[1]):
            h, cell = model.controller(torch.cat([x[b, t], *reads]).view(1, -1), (h, cell))
            hv = h.view(-1)
            p = model.head_params(hv)
            order = torch.sort(usage.detach(), stable=True).indices
            least_used = x.new_zeros(n)
            least_used[order[:nr]] = 1.0
            memory = memory.clone()
            memory[order[0]] = 0.0
            keys, write_w = [], []
            for r in range(nr):
                keys.append(torch.tanh(p[r * per : r * per + m]))
                sigma = torch.sigmoid(p[r * per + m])
                write_w.append(sigma * read_w[r] + (1 - sigma) * least_used)
            for r in range(nr):
                memory = memory + torch.outer(write_w[r], keys[r])
            read_w = []
            for r in range(nr):
                beta = 1 + F.softplus(p[r * per + m + 1]) if c.learn_key_strength else x.new_ones(())
                read_w.append(_content(memory, keys[r], beta))
            reads = [read_w[r] @ memory for r in range(nr)]
            usage = c.usage_decay * usage + sum(read_w) + sum(write_w)
            outs.append(model.output(torch.cat([hv, *reads])))
        ys.append(torch.stack(outs))
        finals.append({"memory": memory, "usage": usage, "read_weights": torch.stack(read_w)})
    return torch.stack(ys), {k: torch.stack([f[k] for f in finals]) for k in finals[0]}
