"""learner: a small, callback-based training loop for PyTorch."""

from learner.callbacks import (
    DeviceCB,
    EarlyStoppingCB,
    MetricsCB,
    Monitor,
    ProgressCB,
    RecorderCB,
    SaveBestCB,
    TerminateOnNaNCB,
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
from learner.io import atomic_save

__all__ = [
    "EVENTS",
    "Callback",
    "CancelBatchException",
    "CancelEpochException",
    "CancelFitException",
    "CancelTrainException",
    "CancelValidateException",
    "DataLoaders",
    "DeviceCB",
    "EarlyStoppingCB",
    "Learner",
    "MetricsCB",
    "Monitor",
    "ProgressCB",
    "RecorderCB",
    "SaveBestCB",
    "TensorLoader",
    "TerminateOnNaNCB",
    "TrainEvalCB",
    "accuracy",
    "atomic_save",
    "default_device",
    "to_device",
]
__version__ = "0.1.0"
