"""The one table of the standard callbacks' `order`, and the constraints between them.

Callbacks run sorted by `order` at every event (lower first; ties keep the order they were
added in). Many dependencies need no order because they span events: `MetricsCB` computes a
phase's values at `after_train`/`after_validate`, before `RecorderCB` makes the epoch's row at
`after_epoch`, which `CSVLoggerCB` writes at `cleanup_epoch`. The ones that do are
`CONSTRAINTS`. Each standard callback takes its `order` from `ORDERS`, and each constraint is
pinned by a test (tests/callbacks/test_order.py), so a change to the table that breaks one fails.
Give a callback of your own an order relative to these: e.g. between `RecorderCB` (-5) and
`ProgressCB` (50) to read the epoch's row before it is printed.

This module imports nothing: it is data.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["CONSTRAINTS", "ORDERS", "Constraint"]

ORDERS: dict[str, int] = {
    "TrainEvalCB": -30,
    "DeviceCB": -20,
    "BatchTransformCB": -18,
    "AccelerateCB": -16,
    "DistributedCB": -15,
    "MetricsCB": -10,
    "RecorderCB": -5,
    "CSVLoggerCB": -4,
    "TensorBoardCB": -4,
    "HooksCB": 0,
    "ActivationStatsCB": 0,
    "GradAccumCB": 5,
    "MixedPrecisionCB": 10,
    "ParamSchedulerCB": 10,
    "LRSchedulerCB": 10,
    "GradClipCB": 15,
    "ProgressCB": 50,
    "SaveBestCB": 55,
    "EarlyStoppingCB": 60,
    "TerminateOnNaNCB": 60,
    "CheckpointCB": 65,
    "CapturePredsCB": 80,
    "LRFinderCB": 90,
    "ResumeCB": 1000,
}
"""Class name -> `order` of each standard callback."""


class Constraint(NamedTuple):
    """`first` must run before `then` at `event`, because of `why`."""

    first: str
    then: str
    event: str
    why: str


CONSTRAINTS: tuple[Constraint, ...] = (
    Constraint("TrainEvalCB", "DistributedCB", "before_train",
               "the DDP wrapper copies the model's train/eval flag"),
    Constraint("DeviceCB", "DistributedCB", "before_fit",
               "DDP wraps the model on the device it will train on"),
    Constraint("DeviceCB", "BatchTransformCB", "before_batch",
               "transforms run on the device, on the moved batch"),
    Constraint("BatchTransformCB", "MixedPrecisionCB", "before_batch",
               "transforms run in full precision, outside autocast"),
    Constraint("DeviceCB", "MetricsCB", "before_fit",
               "metrics accumulate on the model's device"),
    Constraint("DeviceCB", "MixedPrecisionCB", "before_fit",
               "autocast's device type is the model's"),
    Constraint("DeviceCB", "AccelerateCB", "before_fit",
               "Accelerate places the model last: its device wins"),
    Constraint("DeviceCB", "AccelerateCB", "before_batch",
               "a batch DeviceCB moved elsewhere goes on to Accelerate's device"),
    Constraint("AccelerateCB", "DistributedCB", "before_fit",
               "the two together are refused before either sets anything up"),
    Constraint("AccelerateCB", "MetricsCB", "before_fit",
               "metrics accumulate on the device Accelerate put the model on"),
    Constraint("AccelerateCB", "GradClipCB", "before_step",
               "clip the gradients Accelerate's GradScaler unscaled, not max_norm * scale"),
    Constraint("DistributedCB", "MetricsCB", "before_fit",
               "MetricsCB looks at the sharded loaders"),
    Constraint("DistributedCB", "MetricsCB", "after_validate",
               "under FSDP a rank's extra forward pairs with the others' last batch before the "
               "metrics' all-reduce"),
    Constraint("RecorderCB", "TensorBoardCB", "after_epoch",
               "the row is recorded before it is written"),
    Constraint("GradAccumCB", "MixedPrecisionCB", "before_step",
               "batches that do not step are not unscaled: one unscale per step"),
    Constraint("MixedPrecisionCB", "GradClipCB", "before_step",
               "clip the unscaled gradients, not max_norm * scale"),
    Constraint("GradAccumCB", "GradClipCB", "before_step",
               "clip the summed gradients, once per step"),
    Constraint("ParamSchedulerCB", "LRFinderCB", "before_batch",
               "the finder's learning rate wins over a schedule's"),
    Constraint("RecorderCB", "SaveBestCB", "after_epoch",
               "the tracker reads the epoch's row"),
    Constraint("ProgressCB", "EarlyStoppingCB", "after_epoch",
               "the epoch's row is printed before the fit stops"),
    Constraint("SaveBestCB", "EarlyStoppingCB", "after_epoch",
               "the best weights are saved before the fit stops"),
    Constraint("EarlyStoppingCB", "CheckpointCB", "after_epoch",
               "the epoch that stops the fit is not checkpointed: resuming reproduces the stop"),
    Constraint("LRSchedulerCB", "CheckpointCB", "cleanup_batch",
               "a checkpoint holds the scheduler after it stepped"),
    Constraint("RecorderCB", "CheckpointCB", "after_epoch",
               "a checkpoint holds the epoch's row"),
    Constraint("CheckpointCB", "ResumeCB", "before_fit",
               "a resumed fit loads every callback's state after that callback set itself up"),
    Constraint("MixedPrecisionCB", "ResumeCB", "before_fit",
               "the GradScaler exists when its state is loaded"),
)  # fmt: skip
"""The orderings that matter, each pinned by a test."""
