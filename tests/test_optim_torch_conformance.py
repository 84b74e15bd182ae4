"""Where torch's generic optimizer tests hold every torch.optim optimizer to one
behaviour, the adapter behaves as torch.optim.SGD does on the same inputs:
``param_names`` across ``load_state_dict``, the error for a multi-element tensor
``lr``; and float64 parameters are refused with an error saying what to do."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from cupylars.optim import LARS, LARS8bit, LARS32bit  # noqa: E402

CLASSES = [LARS, LARS8bit, LARS32bit]


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))


def _renamed(model: torch.nn.Module, prefix: str) -> list[tuple[str, torch.nn.Parameter]]:
    return [(f"{prefix}.{name}", p) for name, p in model.named_parameters()]


def _stepped(opt: torch.optim.Optimizer, model: torch.nn.Module) -> torch.optim.Optimizer:
    model(torch.ones(1, 4)).sum().backward()
    opt.step()
    return opt


# (saved with names, loaded by an optimizer with names): every combination torch allows.
NAMING = [(True, True), (True, False), (False, True), (False, False)]


def _param_names_after_load(make, saved_named: bool, current_named: bool) -> list:
    """The param groups' names after loading a checkpoint saved under other names."""
    source, target = _model(0), _model(1)
    saved_params = _renamed(source, "old") if saved_named else list(source.parameters())
    current_params = _renamed(target, "new") if current_named else list(target.parameters())
    saved = _stepped(make(saved_params), source).state_dict()
    opt = make(current_params)
    opt.load_state_dict(saved)
    return [group.get("param_names") for group in opt.param_groups] + [
        group.get("param_names") for group in opt.state_dict()["param_groups"]
    ]


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize(("saved_named", "current_named"), NAMING)
def test_load_state_dict_keeps_param_names_as_sgd_does(cls, saved_named, current_named):
    def sgd(params):
        return torch.optim.SGD(params, lr=0.1, momentum=0.9)

    def lars(params):
        return cls(params, lr=0.1, momentum=0.9)

    want = _param_names_after_load(sgd, saved_named, current_named)
    # the saved names win; the current ones stay where the checkpoint has none
    prefix = "old" if saved_named else "new" if current_named else None
    names = [f"{prefix}.{i}.{kind}" for i in (0, 1) for kind in ("weight", "bias")]
    assert want[0] == (names if prefix else None)
    assert _param_names_after_load(lars, saved_named, current_named) == want


def test_loaded_param_names_name_the_parameters_in_skip_counts():
    source, target = _model(0), _model(1)
    saved = _stepped(LARS(_renamed(source, "old"), lr=0.1, momentum=0.9), source).state_dict()
    opt = LARS(target.parameters(), lr=0.1, momentum=0.9)
    opt.load_state_dict(saved)
    assert list(opt.skipped_steps()) == ["old.0.weight", "old.0.bias", "old.1.weight", "old.1.bias"]


def test_loaded_param_names_of_the_wrong_length_raise_and_change_nothing():
    source, target = _model(0), _model(1)
    saved = _stepped(LARS(_renamed(source, "old"), lr=0.1, momentum=0.9), source).state_dict()
    saved["param_groups"][0]["param_names"] = ["old.0.weight"]
    opt = _stepped(LARS(_renamed(target, "new"), lr=0.2, momentum=0.9), target)
    before = opt.state_dict()
    with pytest.raises(ValueError, match=r"param group 0: .*param_names.* 1 name.* 4 parameters"):
        opt.load_state_dict(saved)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for index, state in before["state"].items():
        for key, value in state.items():
            assert torch.equal(after["state"][index][key], value), (index, key)


@pytest.mark.parametrize("capturable", [False, True])
def test_a_multi_element_tensor_lr_raises_torchs_message_once_labelled(capturable):
    params = [torch.nn.Parameter(torch.ones(3))]
    with pytest.raises(ValueError) as torch_error:
        torch.optim.SGD(params, lr=torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError) as ours:
        LARS(params, lr=torch.tensor([0.1, 0.2]), capturable=capturable)
    message = str(ours.value)
    assert str(torch_error.value) in message  # "Tensor lr must be 1-element"
    # labelled once, by the class called
    assert message.startswith("LARS: ") and message.count("LARS: ") == 1, message
    assert "(2,)" in message  # and the shape it got


def test_a_multi_element_tensor_lr_in_an_added_group_names_the_group():
    opt = LARS([torch.nn.Parameter(torch.ones(3))], lr=0.1)
    with pytest.raises(ValueError, match=r"^param group 1: Tensor lr must be 1-element"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], "lr": torch.ones(2, 1)})
    assert len(opt.param_groups) == 1


def test_float64_parameters_are_refused_naming_the_parameter_and_the_cast():
    params = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2, dtype=torch.float64))]
    torch.optim.SGD(params, lr=0.1)  # torch takes them; LARS says why not and what to do
    with pytest.raises(TypeError) as error:
        LARS(params, lr=0.1)
    message = str(error.value)
    assert "param group 0 parameter 1" in message and "torch.float64" in message, message
    assert "cast" in message and "float32" in message and "float64 parameters" in message, message


def test_float64_parameters_by_name_are_refused_with_their_name():
    model = torch.nn.Linear(3, 2).double()
    with pytest.raises(TypeError, match=r"parameter 'weight' has dtype torch\.float64.*cast"):
        LARS(model.named_parameters(), lr=0.1)


def test_a_parameter_made_float64_after_construction_raises_at_the_step_unchanged():
    model = torch.nn.Linear(3, 2)
    opt = LARS(model.named_parameters(), lr=0.1, momentum=0.9)
    model.bias.data = model.bias.data.double()
    model.weight.grad = torch.ones(2, 3)
    model.bias.grad = torch.ones(2, dtype=torch.float64)
    weight = model.weight.detach().clone()
    with pytest.raises(TypeError, match=r"parameter 'bias' has dtype torch\.float64.*cast"):
        opt.step()
    assert torch.equal(model.weight, weight) and not opt.state
