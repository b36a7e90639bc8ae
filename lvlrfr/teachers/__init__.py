"""Frozen teachers: the HR face recognizer (``recognizer``) and the diffusion SR model (``diffusion``).

The diffusion teacher is imported from ``lvlrfr.teachers.diffusion`` directly, so importing this
package does not load diffusers.
"""

from lvlrfr.teachers.recognizer import RecognizerTeacher, load_recognizer
from lvlrfr.teachers.spec import SPEC_PRESETS, RecognizerSpec, TeacherSpecError
from lvlrfr.teachers.zoo import ZooModelNotFoundError

__all__ = [
    "SPEC_PRESETS",
    "RecognizerSpec",
    "RecognizerTeacher",
    "TeacherSpecError",
    "ZooModelNotFoundError",
    "load_recognizer",
]
