"""learner: a small, callback-based training loop for PyTorch."""

from learner.callbacks import (
    ActivationStatsCB,
    CSVLoggerCB,
    DeviceCB,
    GradAccumCB,
    GradClipCB,
    MetricsCB,
    MixedPrecisionCB,
    ProgressCB,
    RecorderCB,
    TensorBoardCB,
    TrainEvalCB,
    accuracy,
    default_device,
    to_device,
)
from learner.core import (
    EVENTS,
    Callback,
    CancelBatchException,
    CancelEpochException,
    CancelFitException,
    CancelStepException,
    CancelTrainException,
    CancelValidateException,
    Learner,
)
from learner.data import DataLoaders, TensorLoader
from learner.hooks import Hook, Hooks, find_modules

__all__ = [
    "EVENTS",
    "ActivationStatsCB",
    "CSVLoggerCB",
    "Callback",
    "CancelBatchException",
    "CancelEpochException",
    "CancelFitException",
    "CancelStepException",
    "CancelTrainException",
    "CancelValidateException",
    "DataLoaders",
    "DeviceCB",
    "GradAccumCB",
    "GradClipCB",
    "Hook",
    "Hooks",
    "Learner",
    "MetricsCB",
    "MixedPrecisionCB",
    "ProgressCB",
    "RecorderCB",
    "TensorBoardCB",
    "TensorLoader",
    "TrainEvalCB",
    "accuracy",
    "default_device",
    "find_modules",
    "to_device",
]
__version__ = "0.1.0"
