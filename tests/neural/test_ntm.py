"""NTM: batched == naive per-sample reference (outputs, states, gradients), batching == looping,
stability under extreme inputs, state persistence, validation, and a tiny copy-task smoke test."""

from __future__ import annotations

import dataclasses
import io
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from memfusion.bench.naive_memories import naive_ntm_forward
from memfusion.errors import InvalidInput
from memfusion.neural.base import MemoryState
from memfusion.neural.dnc import DNC, DNCConfig
from memfusion.neural.ntm import NTM, Controller, NTMConfig, NTMState
from tests.neural._copy import assert_learns_three_step_copy

SMALL = {"memory_slots": 10, "memory_width": 6, "controller_size": 12}


def make(seed: int = 0, **kw: object) -> NTM:
    torch.manual_seed(seed)
    cfg: dict[str, object] = {"input_size": 5, "output_size": 4, **SMALL, **kw}
    return NTM(NTMConfig(**cfg))  # type: ignore[arg-type]


def inputs(b: int, t: int, seed: int = 1, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.randn(b, t, 5, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def grads(model: nn.Module) -> dict[str, Tensor]:
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


CONFIGS = [
    {},
    {"read_heads": 2, "write_heads": 2},
    {"controller": Controller.FEEDFORWARD, "shift_range": 5},
    {"shift_range": 1, "learn_initial_memory": True, "read_heads": 3},
]


@pytest.mark.parametrize("kw", CONFIGS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "default")
def test_batched_equals_naive_per_sample_reference(kw: dict[str, Any]) -> None:
    model = make(**kw).double()
    x = inputs(3, 6, dtype=torch.float64)
    y, state = model(x)
    (y * torch.linspace(-1, 1, 4, dtype=torch.float64)).sum().backward()
    batched_grads = grads(model)
    model.zero_grad()
    y_naive, final = naive_ntm_forward(model, x)
    (y_naive * torch.linspace(-1, 1, 4, dtype=torch.float64)).sum().backward()
    torch.testing.assert_close(y, y_naive, rtol=1e-10, atol=1e-12)
    for name, value in final.items():
        torch.testing.assert_close(getattr(state, name), value, rtol=1e-10, atol=1e-12)
    naive_grads = grads(model)
    assert batched_grads.keys() == naive_grads.keys() and len(batched_grads) >= 8
    for name in batched_grads:
        torch.testing.assert_close(batched_grads[name], naive_grads[name], rtol=1e-8, atol=1e-10, msg=name)


def test_batch_equals_loop_over_single_samples() -> None:
    model = make(read_heads=2)
    x = inputs(4, 7)
    y, state = model(x)
    for b in range(4):
        y_b, state_b = model(x[b : b + 1])
        torch.testing.assert_close(y[b : b + 1], y_b, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(state.memory[b : b + 1], state_b.memory, rtol=1e-5, atol=1e-6)


def _saturate(model: NTM) -> None:
    with torch.no_grad():
        for layer in (model.read_params, model.write_params):
            layer.weight.mul_(100.0)
            layer.bias.copy_(torch.where(torch.arange(layer.bias.numel()) % 2 == 0, 40.0, -40.0))


@pytest.mark.parametrize("case", ["huge", "zeros", "saturated", "huge-feedforward"])
def test_no_nan_or_inf_over_200_steps_with_extreme_inputs(case: str) -> None:
    kw: dict[str, Any] = {"memory_slots": 16, "memory_width": 8, "read_heads": 2, "write_heads": 2}
    if case == "huge-feedforward":
        kw["controller"] = Controller.FEEDFORWARD
    model = make(**kw)
    x = inputs(3, 200)
    if case.startswith("huge"):
        x = x * 1e6
    elif case == "zeros":
        x = torch.zeros_like(x)
    else:
        _saturate(model)
        x = x * 1e3
    y, state = model(x)
    assert torch.isfinite(y).all()
    for field in dataclasses.fields(state):
        value = getattr(state, field.name)
        for t in value if isinstance(value, tuple) else (value,):
            assert torch.isfinite(t).all(), field.name
    (y.pow(2).mean() + state.memory.pow(2).mean()).backward()
    for name, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name


def test_state_to_dict_round_trips_through_torch_save(tmp_path: object) -> None:
    model = make(read_heads=2)
    x = inputs(2, 10)
    with torch.no_grad():
        _, mid = model(x[:, :5])
        path = io.BytesIO()
        torch.save(mid.to_dict(), path)
        path.seek(0)
        loaded = NTMState.from_dict(torch.load(path))
        y_orig, _ = model(x[:, 5:], mid)
        y_loaded, _ = model(x[:, 5:], loaded)
    assert isinstance(loaded.controller, tuple)
    torch.testing.assert_close(y_orig, y_loaded, rtol=0, atol=0)


@pytest.mark.parametrize("kw", [{}, {"learn_initial_memory": True, "controller": Controller.FEEDFORWARD}])
def test_module_state_dict_round_trip(kw: dict[str, Any]) -> None:
    model = make(seed=0, **kw)
    with torch.no_grad():
        model.memory_init.add_(0.01)  # not the constructor's value, so a lost buffer would show
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    other = make(seed=123, **kw)
    other.load_state_dict(torch.load(buffer))
    x = inputs(2, 6)
    torch.testing.assert_close(model(x)[0], other(x)[0], rtol=0, atol=0)


def test_detached_state_carries_no_graph() -> None:
    model = make()
    _, state = model(inputs(2, 3))
    assert state.memory.requires_grad
    assert not any(t.requires_grad for t in (state.detach().memory, *state.detach().controller))


def test_paper_defaults() -> None:
    cfg = NTMConfig(input_size=9, output_size=8)
    assert (cfg.memory_slots, cfg.memory_width, cfg.controller_size, cfg.shift_range) == (128, 20, 100, 3)
    state = NTM(cfg).initial_state(2)
    assert state.memory.shape == (2, 128, 20) and float(state.memory.max()) == pytest.approx(1e-6)
    torch.testing.assert_close(state.read_weights.sum(-1), torch.ones(2, 1))


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"memory_slots": 0}, "memory_slots must be an integer >= 1"),
        ({"read_heads": 0}, "read_heads must be an integer >= 1"),
        ({"shift_range": 2}, "shift_range must be an odd integer"),
        ({"shift_range": 13}, "shift_range must be an odd integer in [1, memory_slots=10]"),
        ({"controller": "lstm"}, "controller must be a Controller"),
        ({"memory_width": 2.5}, "memory_width must be an integer"),
    ],
)
def test_bad_config_raises(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidInput) as info:
        make(**kw)
    assert message in str(info.value)


def test_bad_inputs_raise() -> None:
    model = make()
    with pytest.raises(InvalidInput, match=r"expects input of shape \(B, T, 5\)"):
        model(torch.zeros(2, 3, 6))
    with pytest.raises(InvalidInput, match="NaN or inf"):
        model(torch.full((2, 3, 5), float("nan")))
    with pytest.raises(InvalidInput, match="batch_size"):
        model.initial_state(0)
    with pytest.raises(InvalidInput, match="needs an NTMState"):
        dnc = DNC(DNCConfig(5, 4, memory_slots=4, memory_width=3, controller_size=4))
        model.step(torch.zeros(2, 5), dnc.initial_state(2))
    with pytest.raises(InvalidInput, match="the state's batch 3"):
        model.step(torch.zeros(2, 5), model.initial_state(3))
    with pytest.raises(InvalidInput, match="needs exactly the fields"):
        NTMState.from_dict({"memory": torch.zeros(1, 2, 3)})
    assert isinstance(model.initial_state(1), MemoryState)


def test_loss_goes_down_on_three_step_copy() -> None:
    assert_learns_three_step_copy(make(memory_slots=8, controller_size=32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    model = make(read_heads=2, write_heads=2).double()
    x = inputs(3, 5, dtype=torch.float64)
    y_cpu, _ = model(x)
    y_gpu, state = model.cuda()(x.cuda())
    assert state.memory.is_cuda
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=1e-9, atol=1e-11)
