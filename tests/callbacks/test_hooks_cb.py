"""HooksCB, the course's HooksCallback: run as notebook 10 writes it, on a tiny CNN."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

import matplotlib.pyplot as plt
import pytest
import torch
import torch.nn.functional as F
from conftest import GeneralRelu
from torch import nn

from learner import Callback, Learner
from learner.callbacks.hooks_cb import HooksCallback, HooksCB
from learner.hooks import Hook, get_hist, get_min
from learner.hooks import append_stats as our_append_stats

# -- the course's code, as written (miniai/learner.py, init.py, activations.py; notebook 11) ------


def to_cpu(x):
    if isinstance(x, Mapping):
        return {k: to_cpu(v) for k, v in x.items()}
    if isinstance(x, list):
        return [to_cpu(o) for o in x]
    if isinstance(x, tuple):
        return tuple(to_cpu(list(x)))
    res = x.detach().cpu()
    return res.float() if res.dtype == torch.float16 else res


def append_stats(hook, mod, inp, outp):
    if not hasattr(hook, "stats"):
        hook.stats = ([], [], [])
    acts = to_cpu(outp)
    hook.stats[0].append(acts.mean())
    hook.stats[1].append(acts.std())
    hook.stats[2].append(acts.abs().histc(40, 0, 10))


def conv(ni, nf, ks=3, stride=2, act=nn.ReLU):
    res = nn.Conv2d(ni, nf, stride=stride, kernel_size=ks, padding=ks // 2)
    if act:
        res = nn.Sequential(res, act())
    return res


def get_model(act=nn.ReLU, nfs=(4, 8)):
    layers = [conv(1, nfs[0], act=act)]
    layers += [conv(nfs[i], nfs[i + 1], act=act) for i in range(len(nfs) - 1)]
    return nn.Sequential(*layers, conv(nfs[-1], 10, act=None), nn.Flatten())


def risinstance(types):  # fastcore's: a partial, neither a type nor a module
    return functools.partial(lambda t, o: isinstance(o, t), types)


# -- a tiny CNN on 8x8 random images: 4 training batches, 2 validation batches ---------------------

N_TRAIN, N_VALID = 4, 2


def _dls() -> Any:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 1, 8, 8, generator=g), torch.randint(0, 10, (96,), generator=g)
    train = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]
    return SimpleNamespace(train=train, valid=[(x[64:80], y[64:80]), (x[80:], y[80:])])


def _learn(act: Any = nn.ReLU, **kw: Any) -> Learner:
    torch.manual_seed(0)
    model = get_model(act)
    return Learner(model, _dls(), F.cross_entropy, lr=0.1, opt_func=torch.optim.SGD, **kw)


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks for m in model.modules())


def _keep_input(hook: Hook, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
    hook.stored.append(inputs[0].detach().clone())


def test_the_course_way_records_every_training_batch() -> None:
    learn = _learn()
    hc = HooksCallback(append_stats, mod_filter=risinstance(nn.Conv2d))
    learn.fit(2, cbs=[hc])
    convs = [learn.model[0][0], learn.model[1][0], learn.model[2]]
    assert len(hc) == 3 and [h.module for h in hc] == convs
    for h in hc:  # one entry per training batch; validation batches not recorded
        assert [len(s) for s in h.stats] == [2 * N_TRAIN] * 3
        assert get_hist(h).shape == (40, 2 * N_TRAIN) and get_min(h).shape == (2 * N_TRAIN,)
    assert _no_hooks(learn.model)
    for h in hc:
        plt.plot(h.stats[0])
    lines = plt.gca().get_lines()
    assert [list(line.get_ydata()) for line in lines] == [
        [m.item() for m in h.stats[0]] for h in hc
    ]
    plt.close("all")


def test_our_append_stats_is_the_courses() -> None:
    act = functools.partial(GeneralRelu, leak=0.1, sub=0.4)
    course, ours = HooksCB(append_stats, nn.Conv2d), HooksCB(our_append_stats, nn.Conv2d)
    _learn(act).fit(1, cbs=[course])  # one learner holds one HooksCB: a second replaces it
    _learn(act).fit(1, cbs=[ours])  # the same seeds: the same run
    for a, b in zip(course, ours, strict=True):
        for sa, sb in zip(a.stats, b.stats, strict=True):
            assert len(sa) == N_TRAIN and all(torch.equal(x, y) for x, y in zip(sa, sb))


def test_a_predicate_selects_exactly_the_general_relus() -> None:
    learn = _learn(act=functools.partial(GeneralRelu, leak=0.1, sub=0.4))
    hc = HooksCB(append_stats, mod_filter=lambda m: isinstance(m, GeneralRelu))
    learn.fit(1, cbs=[hc])
    assert [h.module for h in hc] == [learn.model[0][1], learn.model[1][1]]
    # GeneralRelu(leak=0.1, sub=0.4) outputs at least -0.4 * 1.1: its mean is above that.
    assert all(len(h.stats[0]) == N_TRAIN and min(h.stats[0]) > -0.44 for h in hc)


@pytest.mark.parametrize(("on_train", "on_valid"), [(True, False), (False, True), (True, True)])
def test_hooks_see_the_batches_of_the_phases_asked(on_train: bool, on_valid: bool) -> None:
    learn = _learn()
    first = learn.model[0][0]  # its input is the batch itself
    hc = HooksCB(_keep_input, on_train=on_train, on_valid=on_valid, mods=[first])
    learn.fit(2, cbs=[hc])
    dls = learn.dls
    epoch = (dls.train if on_train else []) + (dls.valid if on_valid else [])
    expected = [x for x, _ in epoch * 2]
    (hook,) = hc
    assert len(hook.stored) == len(expected)
    assert all(torch.equal(a, b) for a, b in zip(hook.stored, expected))


@pytest.mark.filterwarnings("ignore:lr_find")
def test_no_call_outside_the_batches_of_a_fit() -> None:
    x = torch.randn(3, 1, 8, 8)

    class LooksAtTheModel(Callback):
        def after_train(self, learn: Learner) -> None:
            learn.model(x)  # between batches

        def after_epoch(self, learn: Learner) -> None:
            learn.infer(x)
            learn.get_preds()

    hc = HooksCB(_keep_input, on_train=True, on_valid=True, mods=["0.0"])
    learn = _learn(cbs=[hc])
    learn.fit(2, cbs=[LooksAtTheModel()])
    (hook,) = hc
    assert len(hook.stored) == 2 * (N_TRAIN + N_VALID)
    learn.infer(x)  # after the fit: the hooks are gone
    learn.model(x)
    learn.lr_find(num_it=5, stop_factor=None)  # a side run: HooksCB sits it out
    assert list(hc) == [hook] and len(hook.stored) == 2 * (N_TRAIN + N_VALID)
    assert _no_hooks(learn.model)


class RaiseAt(Callback):
    def after_batch(self, learn: Learner) -> None:
        if learn.iter == 1:
            raise ValueError("boom")


def test_hooks_are_removed_after_an_exception() -> None:
    learn = _learn()
    hc = HooksCB(append_stats, nn.Conv2d)
    with pytest.raises(ValueError, match="boom"):
        learn.fit(1, cbs=[hc, RaiseAt()])
    assert _no_hooks(learn.model)
    assert [len(h.stats[0]) for h in hc] == [2, 2, 2]  # kept: what was recorded before

    def fails(hook: Hook, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        raise RuntimeError("in the hook")

    with pytest.raises(RuntimeError, match="in the hook"):
        learn.fit(1, cbs=[HooksCB(fails, nn.ReLU)])
    assert _no_hooks(learn.model)


def test_by_default_every_module_the_model_included() -> None:
    learn = _learn()
    hc = HooksCB(append_stats)
    learn.fit(1, cbs=[hc])
    assert [h.module for h in hc] == list(learn.model.modules())
    (root, *_) = hc
    assert root.module is learn.model and len(root.stats[0]) == N_TRAIN


def test_mods_win_over_the_filter_and_each_fit_starts_over() -> None:
    learn = _learn()
    hc = HooksCB(append_stats, mod_filter=nn.Conv2d, mods=["1.0", learn.model[2]])
    learn.fit(1, cbs=[hc])
    before = list(hc)
    learn.fit(1, cbs=[hc])
    assert [h.module for h in hc] == [learn.model[1][0], learn.model[2]]
    assert all(len(h.stats[0]) == N_TRAIN for h in [*before, *hc])  # new hooks each fit
    assert not any(a is b for a, b in zip(before, hc))


def test_before_any_fit_it_has_no_hooks() -> None:
    hc = HooksCallback(append_stats)
    assert HooksCallback is HooksCB and len(hc) == 0 and list(hc) == []
    assert HooksCB.in_side_runs is False and f"Order: {HooksCB.order}" in (HooksCB.__doc__ or "")


def test_bad_arguments() -> None:
    with pytest.raises(TypeError, match="hookfunc must be a function"):
        HooksCB("append_stats")
    with pytest.raises(ValueError, match=r"on_train=True .* or on_valid=True"):
        HooksCB(append_stats, on_train=False)
    learn = _learn()
    with pytest.raises(ValueError, match=r"predicate .*<lambda> matched no module"):
        learn.fit(1, cbs=[HooksCB(append_stats, lambda m: isinstance(m, GeneralRelu))])
    assert _no_hooks(learn.model)
