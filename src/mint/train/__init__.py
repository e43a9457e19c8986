"""The trainer layer: LoRA training over a resident base, many policies time-sliced on it."""

from mint.train.losses import LOSSES
from mint.train.passes import TrainJob
from mint.train.trainer import Trainer
from mint.train.types import AdamParams, ForwardBackwardResult, TrainDatum

__all__ = ["LOSSES", "AdamParams", "ForwardBackwardResult", "TrainDatum", "TrainJob", "Trainer"]
