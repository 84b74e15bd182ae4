"""torch.compile around the torch adapter's step.

The step runs NumPy or CuPy code that dynamo cannot trace, so it must leave the
compiled region (a graph break) and run eagerly: the results then equal those of
an uncompiled run bit for bit, since the optimizer's arithmetic is the same code.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from cupylars.optim import LARS, LARS8bit, LARS32bit  # noqa: E402

# 64 x 80 = 5120 weights: above min_8bit_size (4096), so LARS8bit keeps 8-bit state.
IN, OUT = 80, 64
HP = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "trust_coefficient": 1e-3}
OPTIMIZERS = {
    "LARS": lambda ps: LARS(ps, **HP),
    "LARS8bit": lambda ps: LARS8bit(ps, **HP),
    "LARS32bit": lambda ps: LARS32bit(ps, **HP),
}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()  # each test compiles afresh, below the recompile limit
    yield
    torch._dynamo.reset()


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(IN, OUT), torch.nn.Tanh(), torch.nn.Linear(OUT, 3))


def _batches(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(16, IN, generator=gen), torch.randn(16, 3, generator=gen)) for _ in range(steps)]


def _set_grads(model: torch.nn.Module, step: int) -> None:
    gen = torch.Generator().manual_seed(100 + step)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen) * 1e-2


def _assert_bitwise_equal(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), f"{name}: max diff {(pa - pb).abs().max().item():.3e}"


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_compiled_step_equals_eager_step(name):
    eager, compiled = _model(), _model()
    eager_opt, compiled_opt = OPTIMIZERS[name](eager.parameters()), OPTIMIZERS[name](compiled.parameters())
    step = torch.compile(compiled_opt.step)  # the default backend (inductor)
    for k in range(3):
        _set_grads(eager, k)
        _set_grads(compiled, k)
        eager_opt.step()
        step()
    _assert_bitwise_equal(compiled, eager)
    assert compiled_opt.backends == eager_opt.backends
    first = next(eager.parameters())
    assert not torch.equal(first, _model()[0].weight)  # the steps moved the parameters


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_compiled_training_step_equals_eager_training(name):
    """A compiled forward, backward and opt.step: the model runs through aot_eager, which
    traces the same aten operations as eager autograd runs (no fusion, no reordering),
    so the whole training run is bitwise equal and any difference is the optimizer's."""

    def train_step(model, opt, x, y):
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        return loss.detach()

    eager, compiled = _model(), _model()
    eager_opt, compiled_opt = OPTIMIZERS[name](eager.parameters()), OPTIMIZERS[name](compiled.parameters())
    compiled_step = torch.compile(train_step, backend="aot_eager")
    for x, y in _batches(3):
        want = train_step(eager, eager_opt, x, y)
        got = compiled_step(compiled, compiled_opt, x, y)
        assert torch.equal(got, want)
    _assert_bitwise_equal(compiled, eager)
    assert compiled_opt.state_dict()["state"].keys() == eager_opt.state_dict()["state"].keys()
