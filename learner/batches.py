"""The batch protocol: how a batch becomes the model's inputs and the loss's targets, and how what
the model returns becomes the predictions and, without a loss function, the loss.

One object holds it, `BatchFormat`, the learner's `batch_format`. For every batch the loop sets

- `learn.xb, learn.yb = learn.batch_format.split(learn.batch, to_model)`: the inputs (a tuple
  of positional arguments, or a dict of keyword arguments) and the targets (a tuple, empty when
  the batch has none);
- `learn.output = learn.model(*xb)` (`model(**xb)` for a dict) in the `predict` step, and
  `learn.preds = learn.batch_format.preds(output)`: what the loss, the metrics and predictions
  see;
- `learn.loss = learn.loss_func(preds, *yb)` in the `get_loss` step, or, when `loss_func` is
  None, `learn.batch_format.loss(output)`: the model's own loss.

The defaults take what PyTorch loaders and Hugging Face collators yield:

- a tuple or list `(x, y)`, `(x1, ..., xn, y, ...)`: the inputs are its first `n_inp` items
  (default 1), the targets the rest;
- `(x,)`, or a tensor `x`: the inputs `(x,)`, no targets;
- a dict (`{input_ids, attention_mask, labels}`, a Hugging Face collator's): the inputs are
  every key but the targets, as keyword arguments; the targets the values of the `targets`
  key(s), default `"labels"`, where present.

When the model computes its own loss (`loss_func=None`) it gets the targets too: the whole batch
(`model(**batch)`, `model(*batch)`), as the Hugging Face Trainer calls its models.

`preds(output)` is the output as the model returned it (a tensor, a tuple, a dict), except an
output object with a `.logits` tensor (a Hugging Face `ModelOutput`), whose logits it is.
`loss(output)` is the output's `.loss` (or its `"loss"` key).

Another structure takes one small function: `BatchFormat(split=lambda b: ((b["img"],),
(b["label"],)))`, or `BatchFormat(inputs="img", targets="label")` for a dict. This module
imports only leaf helpers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from learner.checks import describe

__all__ = ["BatchFormat", "Inputs", "batch_size", "first_tensor", "item_count"]

Inputs = tuple[Any, ...] | dict[str, Any]
"""The model's inputs: positional arguments (a tuple) or keyword arguments (a dict)."""

_PLAIN = (tuple, list, dict)


def _keys(keys: str | Sequence[str], what: str) -> tuple[str, ...]:
    out = (keys,) if isinstance(keys, str) else tuple(keys)
    if not all(isinstance(k, str) for k in out):
        raise TypeError(f"BatchFormat({what}=...) takes a key or a sequence of keys, got {keys!r}.")
    return out


class BatchFormat:
    """How a batch becomes the model's inputs and the loss's targets (`split`), and what the model
    returns its predictions (`preds`) and its own loss (`loss`): see `learner.batches`.

    Args:
        n_inp: for tuple and list batches, how many leading items are the model's inputs; the
            rest are the targets, passed to the loss as `loss_func(preds, *targets)`. Default 1.
        targets: for dict batches, the key, or keys, of the targets. Default `"labels"` (the
            Hugging Face convention). A batch without them has no targets.
        inputs: for dict batches, which keys the model takes: None (default) every key but the
            targets, as keyword arguments; a key, whose value is the model's one positional
            input (`model(batch["image"])`); a sequence of keys, as keyword arguments.
        split: a function `batch -> (inputs, targets)` for any other structure: `inputs` a
            tuple (positional) or a dict (keyword arguments), `targets` a tuple. Replaces the
            rules above; the model gets exactly `inputs`, also without `loss_func`.
        preds: a function `output -> predictions`, what the loss, metrics and predictions see.
            Default: the output, or its `.logits` for an output object that has them.
        loss: a function `output -> loss` for `loss_func=None`. Default: `output.loss`.

    Examples:
        >>> Learner(model, dls, F.mse_loss, batch_format=BatchFormat(n_inp=2))  # (x1, x2, y)
        >>> fmt = BatchFormat(inputs="image", targets="label")  # {"image": x, "label": y}
        >>> fmt.split({"image": torch.ones(2, 3), "label": torch.tensor([0, 1])})[1]
        (tensor([0, 1]),)
        >>> BatchFormat(preds=lambda out: out[0])  # a model returning (logits, aux)
    """

    def __init__(
        self,
        n_inp: int = 1,
        targets: str | Sequence[str] = "labels",
        inputs: str | Sequence[str] | None = None,
        split: Callable[[Any], tuple[Inputs, tuple[Any, ...]]] | None = None,
        preds: Callable[[Any], Any] | None = None,
        loss: Callable[[Any], torch.Tensor] | None = None,
    ) -> None:
        if isinstance(n_inp, bool) or not isinstance(n_inp, int) or n_inp < 1:
            raise ValueError(f"BatchFormat n_inp must be an int >= 1, got {n_inp!r}.")
        for name, fn in (("split", split), ("preds", preds), ("loss", loss)):
            if fn is not None and not callable(fn):
                raise TypeError(f"BatchFormat({name}=...) takes a function, got {fn!r}.")
        self.n_inp = n_inp
        self.targets = _keys(targets, "targets")
        self.inputs = None if inputs is None else _keys(inputs, "inputs")
        self.positional = isinstance(inputs, str)
        self.custom_split, self.custom_preds, self.custom_loss = split, preds, loss

    def __repr__(self) -> str:
        return (
            f"BatchFormat(n_inp={self.n_inp}, targets={self.targets}, inputs={self.inputs}"
            + "".join(
                f", {n}=..." for n in ("split", "preds", "loss") if getattr(self, "custom_" + n)
            )
            + ")"
        )

    def split(self, batch: Any, to_model: bool = False) -> tuple[Inputs, tuple[Any, ...]]:
        """`(inputs, targets)` of `batch`; with `to_model` (the model computes its own loss) the
        inputs are the whole batch, targets included."""
        if self.custom_split is not None:
            inputs, targets = self.custom_split(batch)
            if isinstance(inputs, Mapping):
                inputs = dict(inputs)
            if not isinstance(inputs, (tuple, dict)) or not isinstance(targets, tuple):
                raise TypeError(
                    "BatchFormat(split=f): f(batch) must return (inputs, targets), inputs a tuple "
                    f"or a dict and targets a tuple; got ({type(inputs).__name__}, "
                    f"{type(targets).__name__})."
                )
            return inputs, targets
        if isinstance(batch, (tuple, list)):  # the usual (x, y) first: no ABC check for it
            n = len(batch) if to_model else self.n_inp
            return tuple(batch[:n]), tuple(batch[n:])
        if isinstance(batch, Mapping):
            return self._split_dict(batch, to_model)
        return (batch,), ()

    def _split_dict(
        self, batch: Mapping[str, Any], to_model: bool
    ) -> tuple[Inputs, tuple[Any, ...]]:
        targets = tuple(batch[k] for k in self.targets if k in batch)
        if self.inputs is None:
            return {k: v for k, v in batch.items() if to_model or k not in self.targets}, targets
        missing = [k for k in self.inputs if k not in batch]
        if missing:
            raise KeyError(
                f"BatchFormat(inputs={list(self.inputs)}): the batch has no key "
                f"{missing[0]!r}; its keys are {list(batch)}."
            )
        if self.positional and not to_model:
            return (batch[self.inputs[0]],), targets
        # The model computes its own loss: it gets the targets too, all by keyword.
        keys = [*self.inputs, *(k for k in self.targets if to_model and k in batch)]
        return {k: batch[k] for k in keys}, targets

    def preds(self, output: Any) -> Any:
        """What the loss, metrics and predictions see of the model's `output`."""
        if self.custom_preds is not None:
            return self.custom_preds(output)
        if isinstance(output, torch.Tensor) or type(output) in _PLAIN:
            return output
        logits = getattr(output, "logits", None)
        return logits if isinstance(logits, torch.Tensor) else output

    def loss(self, output: Any) -> torch.Tensor:
        """The model's own loss in its `output`, for a learner with `loss_func=None`."""
        if self.custom_loss is not None:
            return self.custom_loss(output)
        loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
        if not isinstance(loss, torch.Tensor):
            raise ValueError(
                "loss_func=None trains on the model's own loss, the .loss of what it returns, "
                f"but the model returned {describe(output)}"
                + (" whose loss is None" if _has_loss_field(output) else " with no loss")
                + ". A Hugging Face model computes it when the batch holds its labels (the "
                "dict key 'labels'; another key: BatchFormat(targets=...)). Otherwise pass a "
                "loss_func, or BatchFormat(loss=f) to find the loss in the output."
            )
        return loss

    def check(self, batch: Any, where: str) -> None:
        """A ValueError unless the default `split` takes `batch` (checked on the first batch of
        each phase): a tuple or list of at least one item, a dict, or a tensor."""
        if self.custom_split is not None:
            return
        if isinstance(batch, (tuple, list)) and len(batch) >= 1:
            return
        if isinstance(batch, (Mapping, torch.Tensor)):
            return
        raise ValueError(
            f"{where} yielded a batch that is {describe(batch)}; a batch is a tuple (x, y) of "
            "the model's inputs then the targets, a tuple (x,) or a tensor without targets, or a "
            "dict of named inputs and targets (the key 'labels'). For another structure pass "
            "Learner(..., batch_format=BatchFormat(split=f)), f(batch) -> (inputs, targets)."
        )

    def describe_inputs(self, batch: Any, inputs: Inputs) -> str:
        """The inputs for an error note; for a dict batch, how its keys became them."""
        text = describe(inputs)
        if isinstance(batch, Mapping) and self.custom_split is None:
            text += (
                f" (the dict batch's keys {list(batch)} but the targets {list(self.targets)}, "
                "as keyword arguments; for a model taking other arguments name its input and "
                "target keys: BatchFormat(inputs='image', targets='label'))"
            )
        return text

    def describe_targets(self, batch: Any, targets: tuple[Any, ...]) -> str:
        """The targets for an error note, saying why there are none."""
        if targets:
            return describe(targets)
        if isinstance(batch, Mapping) and self.custom_split is None:
            return (
                f"none (the batch's keys are {list(batch)}, none of them {list(self.targets)}: "
                "name the target key with BatchFormat(targets=...))"
            )
        return "none (the batch holds the inputs only)"


def _has_loss_field(output: Any) -> bool:
    return ("loss" in output) if isinstance(output, Mapping) else hasattr(output, "loss")


def first_tensor(obj: Any) -> torch.Tensor | None:
    """The first tensor in `obj`, through tuples, lists and dicts (in order); None if none."""
    if isinstance(obj, torch.Tensor):
        return obj
    values = obj.values() if isinstance(obj, Mapping) else obj if isinstance(obj, _PLAIN) else ()
    for value in values:
        found = first_tensor(value)
        if found is not None:
            return found
    return None


def item_count(obj: Any) -> int:
    """The number of items in a batch's inputs or targets: the length of the first tensor (or,
    with none, of `obj` itself)."""
    t = first_tensor(obj)
    if t is not None and t.ndim > 0:
        return int(t.shape[0])
    return len(obj)


def batch_size(xb: Inputs, yb: tuple[Any, ...]) -> int:
    """The number of samples in a batch split into inputs `xb` and targets `yb`: the length of
    its first target (the usual `(x, y)`: `len(y)`), or without targets of its first input (a
    dict's first value: `input_ids` for a Hugging Face batch without labels)."""
    if yb and isinstance(yb[0], torch.Tensor) and yb[0].ndim:
        return int(yb[0].shape[0])
    return item_count(yb or xb)
