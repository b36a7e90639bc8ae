"""lvlrfr: very-low-resolution face recognition by generative-discriminative distillation."""

import os

# albumentations checks PyPI for a newer release on import unless this is set.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"
