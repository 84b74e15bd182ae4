"""Fuzzed optimizer checkpoints: a real state dict, one entry mutated, loaded into a fresh
optimizer over a copy of the model.

Every mutated checkpoint is either refused with a ValueError, TypeError or KeyError whose
message names the parameter or the key, leaving the optimizer exactly as it was, or it
loads and the next step leaves every parameter finite.
"""

from __future__ import annotations

import copy
import functools
import math
import warnings
from typing import Any

import pytest

torch = pytest.importorskip("torch")
hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies

from cupylars.optim import LARS8bit, LARS32bit  # noqa: E402

HYPER = dict(lr=0.2, momentum=0.9, weight_decay=1e-3, percentile_clipping=30, min_8bit_size=1000)
CLASSES = {"LARS8bit": LARS8bit, "LARS32bit": LARS32bit}
STATE_KEYS = ("step", "skipped", "state1", "absmax1", "gnorm_vec")
GROUP_KEYS = (
    "lr",
    "momentum",
    "dampening",
    "weight_decay",
    "nesterov",
    "percentile_clipping",
    "max_unorm",
    "trust_coefficient",
    "eps",
    "optim_bits",
    "min_8bit_size",
    "nonfinite",
    "foreach",
    "params",
)


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    # 5120 weights keep 8-bit momentum (min_8bit_size 1000); the rest keep float32.
    return torch.nn.Sequential(torch.nn.Linear(64, 80), torch.nn.Tanh(), torch.nn.Linear(80, 10))


def set_grads(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    model.zero_grad()
    model(torch.randn(16, 64, generator=gen)).pow(2).mean().backward()


@functools.cache
def saved(name: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A model and its optimizer's state dict after three steps with percentile clipping."""
    model = make_model()
    opt = CLASSES[name](model.parameters(), **HYPER)
    for k in range(3):
        set_grads(model, k)
        opt.step()
    return model, copy.deepcopy(opt.state_dict())


# ---- mutations -------------------------------------------------------------------------------------------
def _retype(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return value.to(dtype)


def _element(value: Any, x: float) -> Any:
    """``value`` with one element set to ``x`` (a tensor of its dtype), or ``x`` itself."""
    if isinstance(value, torch.Tensor) and value.numel() > 1 and value.is_floating_point():
        out = value.clone()
        out.view(-1)[value.numel() // 2] = x
        return out
    if isinstance(value, torch.Tensor):
        return torch.tensor(x, dtype=torch.float64 if isinstance(x, float) else torch.int64)
    return x


VALUE_MUTATIONS = {
    "nan": lambda v: _element(v, math.nan),
    "inf": lambda v: _element(v, math.inf),
    "-inf": lambda v: _element(v, -math.inf),
    "negative": lambda v: _element(v, -1.0) if isinstance(v, torch.Tensor) and v.is_floating_point() else -1,
    "huge float32": lambda v: _element(v, 3.0e38),
    "beyond float32": lambda v: v.double().fill_(1e39) if isinstance(v, torch.Tensor) else 1e39,
    "2**53+1": lambda v: 2**53 + 1,
    "2**63-1": lambda v: torch.tensor(2**63 - 1),
    "2**64": lambda v: 2**64,
    "fraction": lambda v: 2.5,
    "float64": lambda v: _retype(v, torch.float64) if isinstance(v, torch.Tensor) else float(v),
    "float16": lambda v: _retype(v, torch.float16) if isinstance(v, torch.Tensor) else v,
    "int32": lambda v: _retype(v, torch.int32) if isinstance(v, torch.Tensor) else v,
    "bool": lambda v: _retype(v, torch.bool) if isinstance(v, torch.Tensor) else True,
    "uint8": lambda v: _retype(v.clamp(0, 255), torch.uint8) if isinstance(v, torch.Tensor) else v,
    "flattened": lambda v: v.reshape(-1) if isinstance(v, torch.Tensor) else v,
    "extra dim": lambda v: v.unsqueeze(0) if isinstance(v, torch.Tensor) else v,
    "truncated": lambda v: v.reshape(-1)[:-1] if isinstance(v, torch.Tensor) and v.numel() > 1 else v,
    "string": lambda v: "3",
    "list": lambda v: [1, 2],
    "none": lambda v: None,
}
GROUP_VALUES = {
    "nan": math.nan,
    "inf": math.inf,
    "negative": -1.0,
    "huge": 1e30,  # lr 1e30 still steps to finite parameters: max_unorm caps the update
    "2**64": 2**64,
    "string": "0.1",
    "list": [0.1],
    "none": None,
    "bool": True,
}


@st.composite
def mutations(draw: Any) -> tuple[str, str, Any, str]:
    """(optimizer class, where, what, how): one change to a saved state dict."""
    name = draw(st.sampled_from(sorted(CLASSES)))
    where = draw(st.sampled_from(["state", "state", "state", "group"]))
    if where == "state":
        index = draw(st.integers(0, 3))
        key = draw(st.sampled_from([*STATE_KEYS, "extra key"]))
        how = draw(st.sampled_from(["missing", *VALUE_MUTATIONS]))
        return name, "state", (index, key), how
    key = draw(st.sampled_from([*GROUP_KEYS, "extra key"]))
    how = draw(st.sampled_from(["missing", *GROUP_VALUES]))
    return name, "group", key, how


def mutate(sd: dict[str, Any], where: str, what: Any, how: str) -> tuple[dict[str, Any], list[str]]:
    """The mutated state dict and the words an error about it may name."""
    sd = copy.deepcopy(sd)
    if where == "state":
        index, key = what
        entry = sd["state"][index]
        if key == "extra key":
            entry["exp_avg"] = torch.zeros(3)
            return sd, [f"parameter {index}", "exp_avg"]
        if key not in entry or how == "missing":
            entry.pop(key, None)
        else:
            entry[key] = VALUE_MUTATIONS[how](entry[key])
        return sd, [f"parameter {index}", key]
    group = sd["param_groups"][0]
    if what == "extra key":
        group["bogus"] = 1
    elif how == "missing":
        group.pop(what, None)
    elif what == "params":
        group["params"] = group["params"][:-1]
    else:
        group[what] = GROUP_VALUES[how]
    return sd, ["param group", str(what)]


def snapshot(opt: torch.optim.Optimizer) -> dict[str, Any]:
    sd = opt.state_dict()
    return {
        "param_groups": copy.deepcopy(sd["param_groups"]),
        "state": {i: {k: v.clone() for k, v in entry.items()} for i, entry in sd["state"].items()},
    }


def assert_same(before: dict[str, Any], opt: torch.optim.Optimizer) -> None:
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert after["state"].keys() == before["state"].keys()
    for i, entry in before["state"].items():
        assert after["state"][i].keys() == entry.keys()
        for key, value in entry.items():
            got = after["state"][i][key]
            assert got.dtype == value.dtype and torch.equal(got, value), (i, key)


@hypothesis.settings(max_examples=80, deadline=None, derandomize=True, database=None)
@hypothesis.given(mutations())
def test_a_mutated_checkpoint_is_refused_cleanly_or_steps_to_finite_parameters(mutation):
    name, where, what, how = mutation
    model, sd = saved(name)
    bad, words = mutate(sd, where, what, how)
    twin = copy.deepcopy(model)
    opt = CLASSES[name](twin.parameters(), **HYPER)
    set_grads(twin, 10)
    opt.step()  # a fresh optimizer with state of its own, which a refused load must keep
    before = snapshot(opt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # re-quantization and optim_bits notes
        try:
            opt.load_state_dict(bad)
        except (ValueError, TypeError, KeyError) as exc:
            message = str(exc)
            assert any(word in message for word in words), (
                f"{type(exc).__name__}: {message!r} names none of {words}"
            )
            assert_same(before, opt)
            return
        set_grads(twin, 11)
        opt.step()
    for p in twin.parameters():
        assert bool(torch.isfinite(p).all()), (
            f"{where} {what} {how}: a loaded checkpoint stepped to non-finite values"
        )


def test_the_unmutated_checkpoint_loads_and_steps():
    for name in CLASSES:
        model, sd = saved(name)
        twin = copy.deepcopy(model)
        opt = CLASSES[name](twin.parameters(), **HYPER)
        opt.load_state_dict(copy.deepcopy(sd))
        set_grads(twin, 11)
        opt.step()
        assert all(bool(torch.isfinite(p).all()) for p in twin.parameters())
