"""learner: a small, callback-based training loop for PyTorch."""

from learner.callbacks import (
    ActivationStatsCB,
    CSVLoggerCB,
    DeviceCB,
    MetricsCB,
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
    "CancelTrainException",
    "CancelValidateException",
    "DataLoaders",
    "DeviceCB",
    "Hook",
    "Hooks",
    "Learner",
    "MetricsCB",
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
