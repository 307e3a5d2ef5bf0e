"""Hook, Hooks and find_modules: hooks see every forward pass and are always removed."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from learner import Hook, Hooks, find_modules


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    return nn.Sequential(nn.Linear(2, 3), nn.ReLU(), inner, nn.Linear(3, 1))


def _keep_output(hook: Hook, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
    hook.stored.append(output)


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks for m in model.modules())


def test_hook_sees_each_forward_and_is_removed() -> None:
    model = _model()
    x = torch.randn(4, 2)
    with Hook(model[0], _keep_output) as hook:
        model(x)
        model(x)
    assert len(hook.stored) == 2 and torch.equal(hook.stored[0], model[0](x))
    assert hook.module is model[0] and _no_hooks(model)
    model(x)
    assert len(hook.stored) == 2
    hook.remove()  # removing twice is harmless


def test_hooks_are_removed_when_the_block_fails() -> None:
    model = _model()
    with pytest.raises(RuntimeError), Hooks(find_modules(model, nn.Linear), _keep_output) as hooks:
        assert len(hooks) == 3 and not _no_hooks(model)
        model(torch.randn(4, 5))  # wrong width: fails in the first layer
    assert _no_hooks(model)


def test_hooks_register_all_or_nothing() -> None:
    model = _model()
    with pytest.raises(TypeError, match=r"nn\.Module"):
        Hooks([model[0], model[1], "not a module"], _keep_output)  # type: ignore[list-item]
    assert _no_hooks(model)


def test_hooks_record_in_module_order() -> None:
    model = _model()
    x = torch.randn(4, 2)
    with Hooks(find_modules(model, nn.ReLU), _keep_output) as hooks:
        model(x)
    h = torch.relu(model[0](x))
    assert torch.equal(hooks[0].stored[0], h)
    assert torch.equal(hooks[1].stored[0], torch.relu(model[2][0](h)))
    assert [hook.module for hook in hooks] == [model[1], model[2][1]]


def test_find_modules_by_type_name_module_and_list() -> None:
    model = _model()
    assert find_modules(model, nn.Linear) == [model[0], model[2][0], model[3]]
    assert find_modules(model, (nn.ReLU, nn.Sequential)) == [model, model[1], model[2], model[2][1]]
    assert find_modules(model, "2.0") == [model[2][0]]
    assert find_modules(model, model[3]) == [model[3]]
    # A mixed list, in the order given, each module once.
    assert find_modules(model, ["3", nn.ReLU, model[1]]) == [model[3], model[1], model[2][1]]


def test_find_modules_errors_say_what_exists() -> None:
    model = _model()
    with pytest.raises(ValueError, match=r"no submodule named 'encoder'.*2\.0 \(Linear\)"):
        find_modules(model, "encoder")
    with pytest.raises(ValueError, match=r"matched no module.*1 \(ReLU\)"):
        find_modules(model, nn.Conv2d)
    with pytest.raises(ValueError, match="not a module of the model"):
        find_modules(model, nn.Linear(2, 2))
    with pytest.raises(TypeError, match=r"nn\.Module subclasses"):
        find_modules(model, int)
    with pytest.raises(TypeError, match="module type, a submodule name"):
        find_modules(model, 3)  # type: ignore[arg-type]
