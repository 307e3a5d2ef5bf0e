"""The standard callbacks: one small module each."""

from __future__ import annotations

from typing import Any

from learner.callbacks.accelerate import AccelerateCB
from learner.callbacks.activation_stats import ActivationStatsCB
from learner.callbacks.batch_transform import BatchTransformCB, tfm_batch
from learner.callbacks.checkpoint import CheckpointCB
from learner.callbacks.csv_logger import CSVLoggerCB
from learner.callbacks.device import DeviceCB, default_device
from learner.callbacks.grad_accum import GradAccumCB
from learner.callbacks.grad_clip import GradClipCB
from learner.callbacks.hooks_cb import HooksCallback, HooksCB
from learner.callbacks.lr_finder import LRFinderCB, LRFindResult, lr_find, steep, valley
from learner.callbacks.metrics import MetricsCB, accuracy
from learner.callbacks.mixed_precision import MixedPrecisionCB
from learner.callbacks.parallel import DistributedCB
from learner.callbacks.progress import ProgressCB
from learner.callbacks.recorder import RecorderCB
from learner.callbacks.resume import ResumeCB
from learner.callbacks.schedule import (
    LRSchedulerCB,
    ParamSchedulerCB,
    Schedule,
    combine_scheds,
    combined_cos,
    fit_one_cycle,
    sched_cos,
    sched_exp,
    sched_lin,
    sched_no,
    set_hyper,
)
from learner.callbacks.tensorboard import TensorBoardCB
from learner.callbacks.tracker import EarlyStoppingCB, Monitor, SaveBestCB, TerminateOnNaNCB
from learner.callbacks.train_eval import TrainEvalCB
from learner.distributed import torchrun_env
from learner.events import Callback

__all__ = [
    "AccelerateCB",
    "ActivationStatsCB",
    "BatchTransformCB",
    "CSVLoggerCB",
    "CheckpointCB",
    "DeviceCB",
    "DistributedCB",
    "EarlyStoppingCB",
    "GradAccumCB",
    "GradClipCB",
    "HooksCB",
    "HooksCallback",
    "LRFindResult",
    "LRFinderCB",
    "LRSchedulerCB",
    "MetricsCB",
    "MixedPrecisionCB",
    "Monitor",
    "ParamSchedulerCB",
    "ProgressCB",
    "RecorderCB",
    "ResumeCB",
    "SaveBestCB",
    "Schedule",
    "TensorBoardCB",
    "TerminateOnNaNCB",
    "TrainEvalCB",
    "accuracy",
    "combine_scheds",
    "combined_cos",
    "default_callbacks",
    "default_device",
    "fit_one_cycle",
    "lr_find",
    "sched_cos",
    "sched_exp",
    "sched_lin",
    "sched_no",
    "set_hyper",
    "steep",
    "tfm_batch",
    "valley",
]


def default_callbacks(metrics: Any = None, distributed: bool = True) -> list[Callback]:
    """The callbacks `Learner(default_cbs=True)` adds, new; `metrics` as in `Learner(metrics=...)`.

    Under torchrun with more than one process (`learner.distributed.torchrun_env()`), also a
    `DistributedCB`, so a script runs unchanged on one process or many; unless `distributed` is
    False (`Learner` passes False when its `cbs=` hold an `AccelerateCB`, which distributes)."""
    if metrics is None:
        metrics_cb = MetricsCB()
    elif isinstance(metrics, dict):
        metrics_cb = MetricsCB(**metrics)
    elif isinstance(metrics, (list, tuple)):
        metrics_cb = MetricsCB(*metrics)
    else:
        metrics_cb = MetricsCB(metrics)
    cbs = [TrainEvalCB(), DeviceCB(), metrics_cb, RecorderCB(), ProgressCB()]
    return [*cbs, DistributedCB()] if distributed and torchrun_env() else cbs
