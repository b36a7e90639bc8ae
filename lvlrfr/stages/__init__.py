"""LightningModules of the training stages; pick one with ``model.class_path`` in a config."""

from lvlrfr.stages.discriminative import DiscriminativeDistillation
from lvlrfr.stages.generative import GenerativeDistillation
from lvlrfr.stages.recognizer_training import RecognizerTraining
from lvlrfr.stages.sr_teacher import SuperResolutionTeacher

__all__ = ["DiscriminativeDistillation", "GenerativeDistillation", "RecognizerTraining", "SuperResolutionTeacher"]
