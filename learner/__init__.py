"""learner: a small, callback-based training loop for PyTorch."""

from learner.callbacks import (
    DeviceCB,
    GradAccumCB,
    GradClipCB,
    MetricsCB,
    MixedPrecisionCB,
    ProgressCB,
    RecorderCB,
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

__all__ = [
    "EVENTS",
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
    "Learner",
    "MetricsCB",
    "MixedPrecisionCB",
    "ProgressCB",
    "RecorderCB",
    "TensorLoader",
    "TrainEvalCB",
    "accuracy",
    "default_device",
    "to_device",
]
__version__ = "0.1.0"
