"""Hook, Hooks and find_modules: hooks see every forward pass and are always removed."""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
from conftest import GeneralRelu
from torch import nn

from learner import Hook, Hooks, find_modules
from learner.hooks import append_stats, get_hist, get_min


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


# -- the course's notebook-10 idioms --------------------------------------------------------------


def _course_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 16), GeneralRelu(0.1, 0.4), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3)
    )


def _hand_hist(values: list[float]) -> list[float]:
    """The course's histc(40, 0, 10) of |values|, one value at a time: beyond 10 is left out."""
    counts = [0.0] * 40
    for v in values:
        if abs(v) <= 10:
            counts[min(int(abs(v) * 4), 39)] += 1
    return counts


def test_hooks_on_a_modules_children_the_course_way() -> None:
    model = _course_model()
    xs = [torch.randn(5, 6) * 30, torch.randn(7, 6)]  # large inputs: some |acts| beyond 10
    with Hooks(model, append_stats) as hooks:  # iterating a Sequential gives its layers
        assert [h.module for h in hooks] == list(model)
        for x in xs:
            model(x)
    assert _no_hooks(model)
    outs = []
    for x in xs:
        per_layer = []
        for layer in model:
            x = layer(x)
            per_layer.append(x.detach())
        outs.append(per_layer)
    for i, h in enumerate(hooks):
        means, stds, hists = h.stats
        acts = [out[i] for out in outs]
        assert [m.item() for m in means] == pytest.approx([a.mean().item() for a in acts])
        assert [s.item() for s in stds] == pytest.approx([a.std().item() for a in acts])
        assert [t.tolist() for t in hists] == [_hand_hist(a.flatten().tolist()) for a in acts]
        # get_hist: (bins, forward passes), log(1 + count); get_min: fraction in the lowest bin.
        hand = [_hand_hist(a.flatten().tolist()) for a in acts]
        assert get_hist(h).shape == (40, 2)
        assert torch.allclose(get_hist(h), torch.tensor(hand).t().log1p())
        assert get_min(h).tolist() == pytest.approx([c[0] / sum(c) for c in hand])
    beyond = int((outs[0][0].abs() > 10).sum())
    assert beyond > 0 and hooks[0].stats[2][0].sum() == 5 * 16 - beyond  # as histc: left out


def test_a_hook_takes_attributes_of_its_own() -> None:
    model = _course_model()
    with Hook(model[0], append_stats) as hook:
        model(torch.randn(4, 6))
    assert len(hook.stats[0]) == 1 and hook.stored == []
    hook.note = "anything"  # type: ignore[attr-defined]
    assert hook.note == "anything"  # type: ignore[attr-defined]


def test_append_stats_counts_half_precision_outputs_in_float32() -> None:
    layer = nn.Identity()
    with Hook(layer, append_stats) as hook:
        layer(torch.zeros(1000, dtype=torch.bfloat16))  # bfloat16 counts stop at 256
        layer(torch.full((3,), 0.3, dtype=torch.float16))
    (zeros, *_), (_, point3, *_) = hook.stats[2]
    assert hook.stats[2][0].dtype == torch.float32 and zeros == 1000 and point3 == 3
    assert get_min(hook).tolist() == [1.0, 0.0]


def test_hooks_slice_and_delete_like_a_list() -> None:
    model = _course_model()
    x = torch.randn(4, 6)
    with Hooks(model, _keep_output) as hooks:
        assert len(hooks) == 5
        head = hooks[:-1]
        assert isinstance(head, list) and [h.module for h in head] == list(model)[:-1]
        first, rest = hooks[0], list(hooks)[1:]
        del hooks[0]  # removed from its module and from the sequence, and only that one
        assert len(hooks) == 4 and list(hooks) == rest and not model[0]._forward_hooks
        assert all(len(m._forward_hooks) == 1 for m in list(model)[1:])
        model(x)
        assert first.stored == [] and all(len(h.stored) == 1 for h in hooks)
        del hooks[-2:]
        assert [h.module for h in hooks] == [model[1], model[2]]
        assert not model[3]._forward_hooks and not model[4]._forward_hooks
        assert len(model[1]._forward_hooks) == 1
    assert _no_hooks(model)


def test_hooks_on_the_children_of_any_module() -> None:
    class Net(nn.Module):  # not iterable itself: its children are hooked
        def __init__(self) -> None:
            super().__init__()
            self.body, self.head = nn.Linear(2, 3), nn.Linear(3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.body(x))

    net = Net()
    with Hooks(net, _keep_output) as hooks:
        net(torch.randn(4, 2))
    assert [h.module for h in hooks] == [net.body, net.head]
    assert [h.stored[0].shape for h in hooks] == [(4, 3), (4, 1)]
    with pytest.raises(ValueError, match=r"Linear has none.*\[module\]"):
        Hooks(nn.Linear(2, 2), _keep_output)


def test_find_modules_by_predicate() -> None:
    model = _course_model()
    model.append(nn.Sequential(GeneralRelu(maxv=6.0)))
    relus = [model[1], model[5][0]]
    assert find_modules(model, lambda m: isinstance(m, GeneralRelu)) == relus
    # The course's fc.risinstance(GeneralRelu): a partial, not a type and not a module.
    assert find_modules(model, _risinstance(GeneralRelu)) == relus
    # Called on every module, the model itself included; mixed in a list like the rest.
    assert find_modules(model, lambda m: True) == list(model.modules())
    assert find_modules(model, ["4", _risinstance(nn.ReLU)]) == [model[4], model[3]]
    with pytest.raises(ValueError, match=r"predicate .*<lambda> matched no module.*1 \(Gen"):
        find_modules(model, lambda m: isinstance(m, nn.Conv2d))


def _risinstance(types: Any) -> Any:
    """fastcore's `risinstance(types)`: `partial(isinstance with obj last)`."""
    return functools.partial(lambda t, o: isinstance(o, t), types)
