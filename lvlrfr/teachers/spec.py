"""What a pretrained face recognizer expects as input and returns, and the checks against its file.

Inside lvlrfr images are RGB ``(B, 3, H, W)`` in [-1, 1]. A ``RecognizerSpec`` states how one
recognizer differs from that (colour order, layout, normalisation, input size) and what it returns
(embedding size). Loaders read what they can from the model file and raise ``TeacherSpecError``
when the spec disagrees. An ONNX graph fixes input layout, input size and embedding size. An
iResNet state dict fixes architecture, input size and embedding size. Colour order, mean and std
are not stored in these files. For the model files listed by content hash in ``PRESETS_BY_SHA256``
they are checked against the recorded preset. For any other file they come from the spec alone and
must match the model's documentation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

COLOUR_ORDERS = ("RGB", "BGR")
LAYOUTS = ("NCHW", "NHWC")
FLIP_FUSIONS = ("sum", "concat", "none")
UNREADABLE_FIELDS = ("colour_order", "mean", "std")
"""Spec fields that no model file stores; a wrong value goes unnoticed by the loaders."""


@dataclass
class RecognizerSpec:
    """Input convention and output size of a face recognizer.

    Attributes:
        architecture: network name: ``"iresnet18"`` ... ``"iresnet200"`` or ``"mobilefacenet"`` for
            state dicts, a ``build_student`` architecture for checkpoints of this project, and any
            descriptive name (``"onnx"``) for ONNX files, whose graph defines the network.
        input_size: side of the square input in pixels; images of another size are resized to it.
        colour_order: channel order the network expects, ``"RGB"`` or ``"BGR"``.
        layout: tensor layout the network expects, ``"NCHW"`` or ``"NHWC"``.
        mean: subtracted from pixel values in [0, 255].
        std: divisor applied after subtracting ``mean``.
        embedding_size: size of the network's output embedding.
        flip_fusion: how the embeddings of the image and its horizontal flip are combined:
            ``"sum"``, ``"concat"`` (output size doubles) or ``"none"`` (image only).
        model_kwargs: extra constructor arguments of the architecture (e.g. ``{"width": 0.5}``),
            used only when a network is built from a state dict.
    """

    architecture: str = "onnx"
    input_size: int = 112
    colour_order: str = "RGB"
    layout: str = "NCHW"
    mean: float = 127.5
    std: float = 127.5
    embedding_size: int = 512
    flip_fusion: str = "none"
    model_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        choices = {"colour_order": COLOUR_ORDERS, "layout": LAYOUTS, "flip_fusion": FLIP_FUSIONS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"RecognizerSpec.{name} is {getattr(self, name)!r}; choose one of {allowed}")
        for name in ("input_size", "embedding_size"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"RecognizerSpec.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.std <= 0:
            raise ValueError(f"RecognizerSpec.std must be positive, got {self.std!r}")

    @property
    def output_size(self) -> int:
        """Size of the teacher's output: ``embedding_size``, doubled by ``flip_fusion="concat"``."""
        return self.embedding_size * (2 if self.flip_fusion == "concat" else 1)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SPEC_PRESETS: dict[str, RecognizerSpec] = {
    # MobileFaceNet ArcFace model converted from TFLite: channels-last input, 192-d output.
    "mobilefacenet_arcface": RecognizerSpec("mobilefacenet", 112, "RGB", "NHWC", 127.5, 128.0, 192),
    # faceplugin-face-recognition-js fr_feature.onnx. Its package documents RGB input, but BGR scores
    # higher on every metric of all 6,000 LFW View-2 pairs (aligned 112x112 faces, image + mirror
    # summed, 10 folds, onnxruntime on CPU, `lvlrfr evaluate`): accuracy 98.92 +- 0.53% against
    # 98.62 +- 0.51%, TAR@FAR=1e-3 97.27% against 96.97%, TAR@FAR=1e-4 96.17% against 92.47%.
    "faceplugin": RecognizerSpec("mobilefacenet", 112, "BGR", "NCHW", 127.0, 128.0, 512),
    # insightface model zoo recognizers; insightface's ArcFaceONNX feeds them RGB (p - 127.5) / 127.5.
    "w600k_r50": RecognizerSpec("iresnet50", 112, "RGB", "NCHW", 127.5, 127.5, 512),
    "w600k_mbf": RecognizerSpec("mobilefacenet", 112, "RGB", "NCHW", 127.5, 127.5, 512),
    "glintr100": RecognizerSpec("iresnet100", 112, "RGB", "NCHW", 127.5, 127.5, 512),
    # arcface_torch trains on RGB images normalised with mean 0.5, std 0.5 after dividing by 255.
    "arcface_torch_r50": RecognizerSpec("iresnet50", 112, "RGB", "NCHW", 127.5, 127.5, 512),
    "arcface_torch_r100": RecognizerSpec("iresnet100", 112, "RGB", "NCHW", 127.5, 127.5, 512),
}
"""Specs of known recognizers, selectable by name in configs (``recognizer_spec: mobilefacenet_arcface`` in a
stage config, ``spec: mobilefacenet_arcface`` in an evaluate config)."""

PRESETS_BY_FILE_NAME: dict[str, str] = {
    "mobilefacenet_arcface.onnx": "mobilefacenet_arcface",
    "fr_feature.onnx": "faceplugin",
    "w600k_r50.onnx": "w600k_r50",
    "w600k_mbf.onnx": "w600k_mbf",
    "glintr100.onnx": "glintr100",
}
"""Preset used when a known model file is loaded without a spec."""

PRESETS_BY_SHA256: dict[str, str] = {
    # mobilefacenet/mobilefacenet_arcface.onnx: MobileFaceNet_TF (MS1M, ArcFace) converted from TFLite.
    "25c1d11c3fdc368b7ae6fcf7fc12608a4bc90d503a2d722f566bfbf529605f87": "mobilefacenet_arcface",
    # faceplugin/fr_feature.onnx from the npm package faceplugin-face-recognition-js 0.0.1.
    "6e524bb134157e6f9b3f2afd911fb66519a1a305b0e1022db02683a098e1ca93": "faceplugin",
}
"""Preset recorded for a model file identified by the sha256 of its content, whatever its name.

A user spec that contradicts the recorded colour order, mean or std raises ``TeacherSpecError``, which
lists these fields together with those read from the graph."""


def file_sha256(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """Return the sha256 hex digest of a file's content."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def preset_for_content(path: str | Path) -> str | None:
    """Return the preset recorded for the content of the file at ``path``, or None."""
    return PRESETS_BY_SHA256.get(file_sha256(path))


def recorded_field_mismatches(
    requested: RecognizerSpec | Mapping[str, Any] | str | None, resolved: RecognizerSpec, known: str, path: str | Path
) -> dict[str, tuple[Any, Any]]:
    """Compare colour order, mean and std of a spec with preset ``known``, recorded for the file at ``path``.

    No model file stores these fields, so only files listed in ``PRESETS_BY_SHA256`` can be checked.
    A mapping spec that names the recorded preset and sets a field itself (``{"preset": "faceplugin",
    "colour_order": "RGB"}``) overrides that field on purpose: this is logged as a warning and accepted.

    Returns:
        ``{field: (value in the spec, value recorded for the file)}`` for each other difference.
    """
    recorded = SPEC_PRESETS[known]
    overridden = set(requested) if isinstance(requested, Mapping) and requested.get("preset") == known else set()
    mismatches = {}
    for name in UNREADABLE_FIELDS:
        value, expected = getattr(resolved, name), getattr(recorded, name)
        if value == expected:
            continue
        if name in overridden:
            logger.warning("%s: %s=%r overrides %r recorded by preset %r for this file", path, name, value, expected, known)
        else:
            mismatches[name] = (value, expected)
    return mismatches


def preset_for_file(path: str | Path) -> str | None:
    """Return the preset name registered for the file name of ``path``, or None."""
    return PRESETS_BY_FILE_NAME.get(Path(path).name)


def resolve_spec(spec: RecognizerSpec | Mapping[str, Any] | str | None, source: str | Path) -> RecognizerSpec | None:
    """Turn a spec given as an object, a preset name or a mapping into a ``RecognizerSpec``.

    A mapping may name a ``preset`` and override some of its fields
    (``{"preset": "mobilefacenet_arcface", "flip_fusion": "sum"}``). Without a spec, the preset
    registered for the file name of ``source`` is used; None is returned when there is none.
    """
    if isinstance(spec, RecognizerSpec):
        return spec
    if spec is None:
        preset = preset_for_file(source)
        return None if preset is None else dataclasses.replace(SPEC_PRESETS[preset])
    if isinstance(spec, str):
        return dataclasses.replace(_preset(spec))
    if isinstance(spec, Mapping):
        fields = dict(spec)
        preset = fields.pop("preset", None)
        known = {f.name for f in dataclasses.fields(RecognizerSpec)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"teacher spec has unknown fields {unknown}; valid fields are {sorted(known)}")
        base = RecognizerSpec() if preset is None else _preset(preset)
        return dataclasses.replace(base, **fields)
    raise TypeError(f"teacher spec must be a RecognizerSpec, a preset name or a mapping, got {type(spec).__name__}")


def _preset(name: str) -> RecognizerSpec:
    if name not in SPEC_PRESETS:
        raise ValueError(f"unknown teacher spec preset {name!r}; choose one of {', '.join(SPEC_PRESETS)}")
    return SPEC_PRESETS[name]


class TeacherSpecError(ValueError):
    """A recognizer's file disagrees with its spec.

    Attributes:
        source: the model file or name.
        mismatches: ``{field: (value in the spec, value found in the file)}``, in the field order of
            ``RecognizerSpec``. For a file known by content, the found colour order, mean and std are
            those of the preset that ``PRESETS_BY_SHA256`` records for it.
        details: extra lines, e.g. missing and unexpected state-dict keys.
        known_preset: the preset recorded for the file's sha256, or None for a file not known by content.
    """

    def __init__(
        self,
        source: str | Path,
        mismatches: Mapping[str, tuple[Any, Any]],
        details: list[str] | None = None,
        known_preset: str | None = None,
    ):
        self.source = str(source)
        self.mismatches = dict(sorted(mismatches.items(), key=lambda item: _field_position(item[0])))
        self.details = list(details or [])
        self.known_preset = known_preset
        super().__init__(self._format())

    def _format(self) -> str:
        lines = [f"The teacher spec does not match the recognizer in {self.source}:"]
        if self.mismatches:
            rows = [("field", "spec (expected)", "file (found)")]
            rows += [(name, str(expected), str(found)) for name, (expected, found) in self.mismatches.items()]
            widths = [max(len(row[i]) for row in rows) for i in range(3)]
            lines += ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
            fixes = ", ".join(f"{name}: {found}" for name, (_, found) in self.mismatches.items())
            lines.append(f"Fix: set {fixes} in the teacher spec, or load the file that the spec describes.")
            lines += self._preset_lines()
        lines += self.details
        if self.known_preset is None:
            lines.append(
                f"{', '.join(UNREADABLE_FIELDS)} cannot be read from a model file; "
                "check them against the model's documentation."
            )
        return "\n".join(lines)

    def _preset_lines(self) -> list[str]:
        """Build the lines naming the preset of the file: the one recorded for its sha256, else the one for its name."""
        file_name = Path(self.source).name
        if self.known_preset is None:
            preset = preset_for_file(self.source)
            if preset is None:
                return []
            return [f"The preset {preset!r} describes files named {file_name}. {_preset_selection(preset)}"]

        preset = self.known_preset
        lines = [f"{file_name} is the file that preset {preset!r} describes (identified by its sha256)."]
        recorded = [name for name in self.mismatches if name in UNREADABLE_FIELDS]
        if recorded:
            names = recorded[0] if len(recorded) == 1 else f"{', '.join(recorded[:-1])} or {recorded[-1]}"
            lines.append(
                f"No model file stores {names}, so the values found for them are those "
                f"that preset {preset!r} records for this file."
            )
        lines.append(_preset_selection(preset))
        if recorded:
            lines.append(
                "To override a recorded field on purpose, name the preset and the field: "
                f"{{preset: {preset}, {recorded[0]}: ...}}."
            )
        return lines


def _field_position(name: str) -> int:
    """Return the position of ``name`` among the ``RecognizerSpec`` fields, or the field count for another name."""
    names = [spec_field.name for spec_field in dataclasses.fields(RecognizerSpec)]
    return names.index(name) if name in names else len(names)


def _preset_selection(preset: str) -> str:
    """Return the sentence telling how to select ``preset`` with each of the two config keys.

    Stage configs name the spec ``recognizer_spec`` and evaluate configs name it ``spec``.
    """
    return (
        f"To use that preset, write recognizer_spec: {preset} in a stage config "
        f"or spec: {preset} in an evaluate config."
    )


def spec_mismatches(spec: RecognizerSpec, found: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Return ``{field: (value in spec, value in found)}`` for each field of ``found`` that differs from ``spec``.

    ``found`` contains the values read from the file (``None`` for a value the file does not fix).
    """
    mismatches = {}
    for name, value in found.items():
        if value is not None and getattr(spec, name) != value:
            mismatches[name] = (getattr(spec, name), value)
    return mismatches


def check_spec(
    spec: RecognizerSpec,
    found: Mapping[str, Any],
    source: str | Path,
    details: list[str] | None = None,
    known_preset: str | None = None,
) -> None:
    """Raise ``TeacherSpecError`` when a field of ``found`` differs from ``spec`` or ``details`` is not empty.

    ``found`` contains the values read from the file (``None`` for a value the file does not fix).
    ``known_preset`` is the preset recorded for the file's sha256, if any.
    """
    mismatches = spec_mismatches(spec, found)
    if mismatches or details:
        raise TeacherSpecError(source, mismatches, details, known_preset)


def onnx_spec_fields(model: Any) -> dict[str, Any]:
    """Read layout, input size and embedding size from the first input and output of an ONNX graph.

    Args:
        model: an ``onnx.ModelProto``.

    Returns:
        ``{"layout", "input_size", "embedding_size"}``. A value is None when the graph leaves it
        open (a symbolic dimension) or ambiguous; ``input_size`` is ``"HxW"`` for a non-square input.
    """
    input_dims = _static_dims(model.graph.input[0])
    output_dims = _static_dims(model.graph.output[0])
    fields: dict[str, Any] = {"layout": None, "input_size": None, "embedding_size": None}
    if len(input_dims) == 4:
        channels_first = input_dims[1] == 3 and input_dims[3] != 3
        channels_last = input_dims[3] == 3 and input_dims[1] != 3
        spatial = None
        if channels_first:
            fields["layout"], spatial = "NCHW", input_dims[2:4]
        elif channels_last:
            fields["layout"], spatial = "NHWC", input_dims[1:3]
        if spatial is not None and None not in spatial:
            height, width = spatial
            fields["input_size"] = height if height == width else f"{height}x{width}"
    feature_dims = output_dims[1:]
    if feature_dims and None not in feature_dims:
        # (N, E) or (N, E, 1, 1): the embedding size is the product of the non-batch dimensions.
        size = 1
        for dim in feature_dims:
            size *= dim
        fields["embedding_size"] = size
    return fields


def _static_dims(value_info: Any) -> list[int | None]:
    """Return the dimensions of an ONNX graph input or output, with None for symbolic ones."""
    dims = value_info.type.tensor_type.shape.dim
    return [dim.dim_value if dim.HasField("dim_value") else None for dim in dims]


def state_dict_differences(expected: Mapping[str, Any], found: Mapping[str, Any], limit: int = 5) -> list[str]:
    """List missing keys, unexpected keys and shape differences between two state dicts.

    Each list shows at most ``limit`` keys. Returns an empty list when keys and shapes agree.
    """
    lines = []
    missing = [key for key in expected if key not in found]
    unexpected = [key for key in found if key not in expected]
    reshaped = [
        f"{key}: spec {tuple(expected[key].shape)}, file {tuple(found[key].shape)}"
        for key in expected
        if key in found and tuple(expected[key].shape) != tuple(found[key].shape)
    ]
    for title, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape differences", reshaped)):
        if keys:
            listed = ", ".join(keys[:limit]) + (", ..." if len(keys) > limit else "")
            lines.append(f"{len(keys)} {title}: {listed}")
    return lines
