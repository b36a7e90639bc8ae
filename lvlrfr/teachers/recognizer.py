"""The frozen high-resolution face recognizer used as the discriminative teacher, and its loaders.

``load_recognizer`` accepts an ONNX file, an insightface model-zoo name, an arcface_torch
``backbone.pth`` state dict, or a Lightning ``.ckpt`` of this project's recognizer training stage.
It returns a ``RecognizerTeacher``, which takes project images (RGB, [-1, 1]) and converts them to
the input that the network's ``RecognizerSpec`` declares.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lvlrfr.models import Student, build_recognizer_network, build_student
from lvlrfr.models.iresnet import IRESNET_LAYERS, describe_iresnet_state_dict, downsampled_size
from lvlrfr.teachers.onnx_network import BACKENDS, build_onnx_network
from lvlrfr.teachers.spec import (
    RecognizerSpec,
    TeacherSpecError,
    check_spec,
    onnx_spec_fields,
    preset_for_content,
    recorded_field_mismatches,
    resolve_spec,
    spec_mismatches,
    state_dict_differences,
)
from lvlrfr.teachers.zoo import DEFAULT_INSIGHTFACE_ROOT, is_zoo_name, resolve_zoo_model

logger = logging.getLogger(__name__)

STATE_DICT_SUFFIXES = (".pth", ".pt")


class RecognizerTeacher(nn.Module):
    """Frozen face recognizer: project images ``(B, 3, H, W)`` RGB in [-1, 1] -> embeddings.

    The forward pass resizes to ``spec.input_size`` (bilinear with antialiasing) when needed, maps
    [-1, 1] to pixel values in [0, 255], normalises them to ``(pixel - mean) / std``, reorders to
    BGR and to NHWC when the spec requires it, and runs ``network``. The result is float32 of shape
    ``(B, spec.output_size)`` and not L2-normalised.

    Parameters never require gradients, and ``train()`` leaves the module in eval mode, so
    Lightning's switch to training mode does not update BatchNorm statistics. Gradients still
    flow to the input images through the torch backends (not through onnxruntime).
    """

    def __init__(self, network: nn.Module, spec: RecognizerSpec, source: str | os.PathLike = "<module>"):
        super().__init__()
        self.network = network
        self.spec = spec
        self.source = str(source)
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> RecognizerTeacher:
        """Keep eval mode whatever ``mode`` is; the teacher is never trained."""
        return super().train(False)

    @property
    def input_size(self) -> int:
        return self.spec.input_size

    @property
    def output_size(self) -> int:
        """Size of the returned embedding (``embedding_size``, doubled by ``flip_fusion="concat"``)."""
        return self.spec.output_size

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """Resize project images to ``input_size`` and normalise them as the network expects.

        Returns ``(B, 3, S, S)`` float32 in RGB channel order and NCHW layout; ``embed`` applies
        colour order and layout.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"teacher expects images of shape (B, 3, H, W), got {tuple(images.shape)}")
        x = images.float()
        size = self.spec.input_size
        if tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        pixels = (x + 1.0) * 127.5
        return (pixels - self.spec.mean) / self.spec.std

    def embed(self, normalised: torch.Tensor) -> torch.Tensor:
        """Run the network on normalised RGB NCHW images ``(B, 3, S, S)`` and return ``(B, embedding_size)``."""
        x = normalised
        if self.spec.colour_order == "BGR":
            x = x.flip(1)
        if self.spec.layout == "NHWC":
            x = x.permute(0, 2, 3, 1).contiguous()
        out = self.network(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out.float().reshape(len(x), -1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Embed project images ``(B, 3, H, W)`` RGB in [-1, 1] into ``(B, output_size)`` float32."""
        x = self.normalise(images)
        if self.spec.flip_fusion == "none":
            return self.embed(x)
        both = self.embed(torch.cat([x, x.flip(-1)]))
        original, flipped = both.chunk(2)
        if self.spec.flip_fusion == "sum":
            return original + flipped
        return torch.cat([original, flipped], dim=1)


def load_recognizer(
    source: str | os.PathLike,
    spec: RecognizerSpec | Mapping[str, Any] | str | None = None,
    backend: str = "auto",
    *,
    prefix: str = "recognizer.",
    insightface_root: str | os.PathLike = DEFAULT_INSIGHTFACE_ROOT,
    download: bool = True,
    download_timeout_s: float = 5.0,
) -> RecognizerTeacher:
    """Load a pretrained recognizer as a frozen ``RecognizerTeacher`` and check it against its spec.

    Args:
        source: an ``.onnx`` file, an insightface model-zoo name (``"buffalo_l"``,
            ``"buffalo_l/w600k_r50.onnx"``, ``"w600k_r50"``), an arcface_torch state dict
            (``.pth``/``.pt``) or a Lightning checkpoint (``.ckpt``) of this project.
        spec: a ``RecognizerSpec``, a preset name (``"mobilefacenet_arcface"``), a mapping of spec
            fields (optionally with ``preset``), or None to use the preset registered for the file
            name or content (ONNX), the arcface_torch convention (``.pth``) or the checkpoint's
            hyper-parameters.
        backend: for ONNX, ``"torch"`` (converted by onnx2torch to a torch module that moves to
            the GPU and runs under AMP; ``"onnx2torch"`` is an alias), ``"onnxruntime"`` (CPU,
            numpy) or ``"auto"`` (torch, falling back to onnxruntime when the conversion fails).
            State dicts and checkpoints always load as torch modules ("auto" or "torch").
        prefix: key prefix of the recognizer's ``backbone.``/``head.`` weights in a ``.ckpt``.
        insightface_root: insightface's root folder for model-zoo names.
        download: allow insightface to download a missing model-zoo pack.
        download_timeout_s: seconds without download progress before giving up.

    Raises:
        TeacherSpecError: the file disagrees with the spec, or the spec contradicts the colour order,
            mean or std recorded for a known ONNX file (``PRESETS_BY_SHA256``). One error lists every
            mismatching field of both kinds.
        FileNotFoundError: ``source`` is neither a file nor an available model-zoo name
            (``ZooModelNotFoundError``, a subclass, names the path at which to place a zoo model).
    """
    path = Path(source).expanduser()
    if not path.exists() and is_zoo_name(source):
        path = resolve_zoo_model(str(source), insightface_root, download, download_timeout_s)
    if not path.is_file():
        raise FileNotFoundError(
            f"teacher source {str(source)!r} is not a file; give an .onnx, .pth or .ckpt path or an insightface "
            "model name such as 'buffalo_l/w600k_r50.onnx'"
        )

    if backend not in BACKENDS:
        raise ValueError(f"unknown teacher backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if path.suffix == ".onnx":
        return load_onnx_recognizer(path, spec, backend)
    if backend == "onnxruntime":
        raise ValueError(f"backend 'onnxruntime' applies to ONNX files only; use 'auto' or 'torch' for {path}")
    if path.suffix in STATE_DICT_SUFFIXES:
        return load_state_dict_recognizer(path, spec)
    if path.suffix == ".ckpt":
        return load_checkpoint_recognizer(path, spec, prefix)
    raise ValueError(f"cannot tell the format of teacher file {path}; expected a .onnx, .pth, .pt or .ckpt file")


def load_onnx_recognizer(
    path: str | os.PathLike,
    spec: RecognizerSpec | Mapping[str, Any] | str | None = None,
    backend: str = "auto",
) -> RecognizerTeacher:
    """Load an ONNX recognizer; see ``load_recognizer`` for the arguments."""
    import onnx

    model = onnx.load(str(path))
    found = onnx_spec_fields(model)
    known = preset_for_content(path)
    resolved = resolve_spec(spec, path)
    if resolved is None and known is not None:
        # A known model file under another name: its recorded preset applies.
        resolved = resolve_spec(known, path)
    if resolved is None:
        raise TeacherSpecError(
            path,
            {},
            [
                f"No spec was given and {Path(path).name} is not a known file. The graph has "
                f"layout={found['layout']}, input_size={found['input_size']}, embedding_size={found['embedding_size']}; "
                "give a spec (or a preset name) that also states colour_order, mean and std."
            ],
        )
    # Fields read from the graph and fields recorded for a known file go into one error, so that a
    # single Fix line lists every value to change.
    mismatches = spec_mismatches(resolved, found)
    if spec is not None and known is not None:
        mismatches |= recorded_field_mismatches(spec, resolved, known, path)
    if mismatches:
        raise TeacherSpecError(path, mismatches, known_preset=known)

    network = build_onnx_network(model, path, backend)
    teacher = RecognizerTeacher(network, resolved, path)
    if found["embedding_size"] is None:
        # NOTE: a symbolic embedding size can be measured only once layout and input size match, because
        # the test run fails otherwise. Its mismatch therefore comes in a second error.
        _check_output_size(teacher, known)
    logger.info("Loaded recognizer %s with %s: %s", path, type(network).__name__, resolved)
    return teacher


def _check_output_size(teacher: RecognizerTeacher, known_preset: str | None) -> None:
    """Run one blank image to measure an embedding size the graph leaves symbolic."""
    size = teacher.spec.input_size
    with torch.no_grad():
        measured = teacher.embed(torch.zeros(1, 3, size, size)).shape[1]
    check_spec(teacher.spec, {"embedding_size": measured}, teacher.source, known_preset=known_preset)


def load_state_dict_recognizer(
    path: str | os.PathLike, spec: RecognizerSpec | Mapping[str, Any] | str | None = None
) -> RecognizerTeacher:
    """Load an arcface_torch-style state dict of an ``IResNet`` or ``MobileFaceNet``.

    Without a spec, an iResNet state dict is described by its own keys and shapes, with
    arcface_torch's input convention (RGB, ``(pixel - 127.5) / 127.5``, NCHW).
    """
    state_dict = _read_state_dict(path)
    description = describe_iresnet_state_dict(state_dict)
    resolved = resolve_spec(spec, path)
    if resolved is None:
        if description is None:
            raise TeacherSpecError(path, {}, ["No spec was given and the file is not an iResNet state dict; give a spec."])
        resolved = RecognizerSpec(
            architecture=description["name"],
            input_size=16 * description["last_map_size"],
            embedding_size=description["num_features"],
        )

    found: dict[str, Any] = {}
    model_kwargs = dict(resolved.model_kwargs)
    if resolved.architecture in IRESNET_LAYERS:
        if description is None:
            found["architecture"] = "not an iResNet state dict"
        else:
            map_size = description["last_map_size"]
            spec_fits = downsampled_size(resolved.input_size, 4) == map_size
            found["architecture"] = description["name"]
            found["input_size"] = resolved.input_size if spec_fits else 16 * map_size
            found["embedding_size"] = description["num_features"]
            # The channel width is not a spec field; it is read from the file unless model_kwargs sets it.
            model_kwargs.setdefault("width", description["width"])
    elif description is not None:
        found["architecture"] = description["name"]
    elif "features.weight" in state_dict:
        found["embedding_size"] = state_dict["features.weight"].shape[0]
    check_spec(resolved, found, path)

    network = build_recognizer_network(
        resolved.architecture, resolved.input_size, resolved.embedding_size, **model_kwargs
    )
    _load_checked(network, state_dict, resolved, path)
    logger.info("Loaded recognizer %s: %s", path, resolved)
    return RecognizerTeacher(network, resolved, path)


def load_checkpoint_recognizer(
    path: str | os.PathLike,
    spec: RecognizerSpec | Mapping[str, Any] | str | None = None,
    prefix: str = "recognizer.",
) -> RecognizerTeacher:
    """Load the ``Student`` (backbone + head) that a Lightning checkpoint stores under ``prefix``.

    The student's ``build_student`` arguments come from the spec (``architecture``,
    ``input_size``, ``embedding_size`` and ``model_kwargs``). Arguments that the spec leaves out
    come from the checkpoint's hyper-parameters: from their top level when it has an ``arch``
    key, otherwise from the first nested mapping that has one. Without a spec, the project's
    image convention applies (RGB, ``(pixel - 127.5) / 127.5``, NCHW).
    """
    # A .ckpt file is a pickle (it may contain the Degradation and other objects in its
    # hyper-parameters), so only checkpoints from a trusted source should be loaded.
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    state_dict = checkpoint.get("state_dict", {})
    student_state = {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}
    if not student_state:
        prefixes = sorted({key.split(".", 1)[0] + "." for key in state_dict})
        raise ValueError(
            f"checkpoint {path} has no weights under {prefix!r}; its top-level prefixes are {prefixes}. "
            "Set the teacher's prefix to the recognizer's attribute name in the training stage."
        )

    arguments = _student_arguments(checkpoint.get("hyper_parameters") or {})
    resolved = resolve_spec(spec, path)
    if resolved is None:
        missing = [name for name in ("arch", "input_size", "embedding_size") if name not in arguments]
        if missing:
            raise ValueError(f"checkpoint {path} does not record {missing} in its hyper-parameters; give a teacher spec")
        resolved = RecognizerSpec(
            architecture=arguments.pop("arch"),
            input_size=arguments.pop("input_size"),
            embedding_size=arguments.pop("embedding_size"),
            model_kwargs=arguments,
        )
    else:
        recorded = {
            "architecture": arguments.pop("arch", None),
            "input_size": arguments.pop("input_size", None),
            "embedding_size": arguments.pop("embedding_size", None),
        }
        check_spec(resolved, recorded, path)

    student_kwargs = {**arguments, **resolved.model_kwargs}
    backbone, head = build_student(resolved.architecture, resolved.input_size, resolved.embedding_size, **student_kwargs)
    network = Student(backbone, head)
    _load_checked(network, student_state, resolved, path)
    logger.info("Loaded recognizer %s (prefix %r): %s", path, prefix, resolved)
    return RecognizerTeacher(network, resolved, path)


def _student_arguments(hyper_parameters: Mapping[str, Any]) -> dict[str, Any]:
    """Return the ``build_student`` arguments found in checkpoint hyper-parameters, or {}."""
    names = set(inspect.signature(build_student).parameters)
    candidates = [hyper_parameters, *(v for v in hyper_parameters.values() if isinstance(v, Mapping))]
    for candidate in candidates:
        if "arch" in candidate:
            return {name: candidate[name] for name in names if name in candidate}
    return {}


def _read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict saved with ``torch.save``, unwrapping ``{"state_dict": ...}`` and DDP's ``module.``."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle errors come in many types; all mean "not a plain state dict"
        raise ValueError(
            f"{path} is not a plain state dict ({type(error).__name__}: {error}); "
            "save the backbone with torch.save(model.state_dict(), path)"
        ) from error
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ValueError(f"{path} does not contain a state dict of tensors; save it with torch.save(model.state_dict())")
    state_dict = dict(loaded)
    if state_dict and all(key.startswith("module.") for key in state_dict):
        state_dict = {key[len("module.") :]: value for key, value in state_dict.items()}
    return state_dict


def _load_checked(network: nn.Module, state_dict: Mapping[str, torch.Tensor], spec: RecognizerSpec, path) -> None:
    """Load ``state_dict`` into ``network`` after checking keys and shapes; raise TeacherSpecError on differences."""
    differences = state_dict_differences(network.state_dict(), state_dict)
    if differences:
        raise TeacherSpecError(
            path,
            {},
            [f"The weights do not fit a {spec.architecture} built from the spec:", *differences],
        )
    network.load_state_dict(state_dict)
