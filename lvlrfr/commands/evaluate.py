"""``lvlrfr evaluate``: score students and recognizers on verification and identification sets at several sizes.

Example::

    lvlrfr evaluate --config configs/evaluate.yaml
    lvlrfr evaluate --config configs/evaluate_lfw_sizes.yaml --sizes '[16, 12, 8]'

Each model embeds every image of a set and its horizontal flip; the two embeddings are summed and
L2-normalised. Verification sets (``lfw``, ``bin``, ``pairs`` and prepared ``.bin`` sets) score pairs by
cosine similarity and report k-fold accuracy with the threshold of each fold chosen on the other folds,
TAR@FAR and ROC curves. Identification sets report closed-set rank-1/5/10 and CMC curves, with the gallery
at the probe's size or, with ``cross_resolution: true``, in high resolution. The run writes
``results.json`` (command, git commit, seed, degradation, data manifest and its hash, every metric),
``results.md`` and the ROC and CMC plots to ``output_dir``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from lvlrfr.commands.parsing import parse_function_arguments
from lvlrfr.data.degradation import Degradation
from lvlrfr.data.sets import EvaluationSet, FaceSet, VerificationSet, load_set
from lvlrfr.evaluation.report import FLIP_FUSION, ResultRow, format_report
from lvlrfr.evaluation.scoring import SetScorer, data_record, gallery_label, plot_curves
from lvlrfr.evaluation.verification import fuse_flip
from lvlrfr.stages.export import load_student
from lvlrfr.teachers.recognizer import RecognizerTeacher, load_recognizer
from lvlrfr.utils.errors import ConfigurationError
from lvlrfr.utils.run_info import run_info, write_json_atomic, write_text_atomic

logger = logging.getLogger(__name__)

__all__ = ["EvaluationSet", "ModelEntry", "VerificationSet", "evaluate", "main"]


@dataclass
class ModelEntry:
    """One model to score.

    Attributes:
        name: row label in the table.
        checkpoint: a student checkpoint (``DiscriminativeDistillation`` or ``RecognizerTraining``).
        recognizer: a pretrained recognizer (ONNX, ``.pth``, ``.ckpt`` or model-zoo name) instead of a student.
        spec: the recognizer's spec preset name or fields.
        backend: recognizer backend, ``auto``, ``torch`` or ``onnxruntime``.
        input: ``vlr`` scores the model on faces degraded to each evaluated size and up-sampled to its
            input size. ``hr`` scores it on the HR faces, which gives one figure per set whatever the size.
    """

    name: str
    checkpoint: str | None = None
    recognizer: str | None = None
    spec: str | dict[str, Any] | None = None
    backend: Literal["auto", "torch", "onnxruntime"] = "auto"
    input: Literal["vlr", "hr"] = "vlr"


class Embedder:
    """A loaded model that embeds project images ``(B, 3, H, W)`` RGB in [-1, 1] into ``(B, D)`` unit vectors.

    Images of another size than ``input_size`` are resized to it (bilinear with antialiasing), which is how
    a student reads the HR gallery of a cross-resolution set. A recognizer's wrapper converts the RGB input
    to the colour order, layout and normalisation of its spec.
    """

    #: Channel order of the images the embedder takes; the recognizer wrapper converts from it.
    input_colour_order = "RGB"

    def __init__(self, entry: ModelEntry, loaded: dict[str, tuple] | None = None) -> None:
        """Load the model of ``entry``, or take it from ``loaded``, which maps model files to loaded models.

        Entries that differ only in name and input (the HR and VLR rows of one recognizer) share one loaded
        model, so a config with both rows opens one onnxruntime session, not two.
        """
        if (entry.checkpoint is None) == (entry.recognizer is None):
            raise ConfigurationError(f"model {entry.name!r}: set exactly one of checkpoint and recognizer")
        self.entry = entry
        loaded = {} if loaded is None else loaded
        key = json.dumps([entry.checkpoint, entry.recognizer, entry.spec, entry.backend], sort_keys=True)
        if key not in loaded:
            loaded[key] = self._load(entry)
        self.network, self.input_size, self.degradation = loaded[key]
        # A recognizer whose spec fuses flips already returns fused embeddings; flipping again would repeat it.
        self.wrapper_fuses_flips = isinstance(self.network, RecognizerTeacher) and self.network.spec.flip_fusion != "none"

    @staticmethod
    def _load(entry: ModelEntry) -> tuple[torch.nn.Module, int, Degradation | None]:
        """Return the network, its input size in pixels and, for a student, its training degradation."""
        if entry.checkpoint is not None:
            network, hparams = load_student(entry.checkpoint)
            degradation = hparams.get("degradation")
            return (network, int(hparams["backbone"]["input_size"]),
                    None if degradation is None else Degradation.from_dict(dict(degradation)))
        network = load_recognizer(entry.recognizer, entry.spec, backend=entry.backend)
        return network, int(network.spec.input_size), None

    def describe(self) -> dict[str, Any]:
        """Return the model entry with what the run used: input size, colour handling, flip fusion."""
        values = {**dataclasses.asdict(self.entry), "input_size": self.input_size,
                  "input_colour_order": self.input_colour_order,
                  "trained_degradation": None if self.degradation is None else self.degradation.to_dict()}
        if isinstance(self.network, RecognizerTeacher):
            spec = self.network.spec
            values["recognizer_spec"] = spec.to_dict()
            values["colour_conversion"] = (f"wrapper converts RGB to {spec.colour_order}" if spec.colour_order != "RGB"
                                           else "none (the recognizer takes RGB)")
            if self.wrapper_fuses_flips:
                values["flip_fusion"] = f"by the recognizer wrapper: {spec.flip_fusion}"
        return values

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if tuple(images.shape[-2:]) != (self.input_size, self.input_size):
            images = F.interpolate(images, size=(self.input_size, self.input_size), mode="bilinear",
                                   align_corners=False, antialias=True)
        if self.wrapper_fuses_flips:
            return F.normalize(self.network(images).float(), dim=1)
        embeddings = self.network(images).float()
        flipped = self.network(torch.flip(images, dims=[3])).float()
        return fuse_flip(embeddings, flipped)


def degradation_difference(reference: Degradation, used: Degradation) -> dict[str, tuple[Any, Any]]:
    """Return ``{field: (reference value, used value)}`` for each field but the sizes where the specs differ."""
    first = {**reference.to_dict(), "vlr_size": None, "input_size": None}
    second = {**used.to_dict(), "vlr_size": None, "input_size": None}
    return {key: (first[key], second[key]) for key in first if first[key] != second[key]}


def reject_mismatch(subject: str, reference_name: str, reference: Degradation, used: Degradation,
                    allow_mismatch: bool) -> str | None:
    """Raise ConfigurationError when ``used`` differs from ``reference``, or return the warning when allowed.

    ``subject`` starts the sentence, e.g. "model 'student' was trained on", and ``reference_name`` names the
    value compared with the requested degradation in the message.
    """
    difference = degradation_difference(reference, used)
    if not difference:
        return None
    fields = "; ".join(f"{key}: {reference_name} {old!r}, requested {new!r}" for key, (old, new) in difference.items())
    message = (f"{subject} degradation {reference.to_dict()} but the evaluation requests {used.to_dict()} "
               f"(differences: {fields}); set the evaluation degradation to match, or pass "
               "--allow_degradation_mismatch true to score it anyway")
    if not allow_mismatch:
        raise ConfigurationError(message)
    logger.warning("%s", message)
    return message


def check_degradation(embedder: Embedder, degradation: Degradation, allow_mismatch: bool) -> str | None:
    """Reject scoring a student on a degradation other than the one it was trained on (except the size)."""
    if embedder.degradation is None:
        return None
    return reject_mismatch(f"model {embedder.entry.name!r} was trained on", "trained", embedder.degradation,
                           degradation, allow_mismatch)


def check_prepared_degradation(face_set: FaceSet, embedders: list[Embedder], degradation: Degradation,
                               allow_mismatch: bool) -> list[str]:
    """Reject a prepared set made with another degradation than the requested one or a student's training one."""
    if face_set.prepared is None:
        return []
    prepared = face_set.prepared.degradation
    subject = f"set {face_set.name!r} ({face_set.prepared.path}) was prepared with"
    warnings = [reject_mismatch(subject, "prepared", prepared, degradation, allow_mismatch)]
    for embedder in embedders:
        if embedder.degradation is not None and embedder.entry.input == "vlr":
            warnings.append(reject_mismatch(subject, "prepared", prepared, embedder.degradation, allow_mismatch))
    return [warning for warning in warnings if warning]


def check_unique_names(models: list[ModelEntry], sets: list[EvaluationSet]) -> None:
    """Reject two sets of one name, or two models of one name and input, whose rows and plots would mix."""
    set_names = [config.name for config in sets]
    repeated = sorted({name for name in set_names if set_names.count(name) > 1})
    if repeated:
        raise ConfigurationError(f"set names {repeated} appear more than once; give each set its own name, which "
                                 "labels its rows and plot files")
    model_keys = [(entry.name, entry.input) for entry in models]
    repeated = sorted({key for key in model_keys if model_keys.count(key) > 1})
    if repeated:
        raise ConfigurationError(f"models {repeated} (name, input) appear more than once; rename one of them")


def evaluate(
    models: list[ModelEntry],
    sets: list[EvaluationSet],
    degradation: Degradation,
    sizes: list[int],
    output_dir: str,
    hr_size: int = 112,
    batch_size: int = 128,
    num_workers: int = 2,
    allow_degradation_mismatch: bool = False,
) -> dict[str, Any]:
    """Score each model on each set at each size; write ``results.json``, ``results.md``, ROC and CMC plots.

    Args:
        models: the models; ``input: hr`` entries give one HR figure per set.
        sets: the evaluation sets (see ``EvaluationSet`` for the kinds).
        degradation: the HR → VLR spec; ``vlr_size`` is replaced by each of ``sizes`` and ``input_size`` by
            each model's input size.
        sizes: VLR sizes in pixels.
        output_dir: folder of the results (and of gallery/probe lists split here).
        hr_size: side of the HR faces in pixels.
        batch_size: images per forward pass.
        num_workers: data loader worker processes.
        allow_degradation_mismatch: score a student, or a prepared set, whose degradation differs from
            ``degradation`` (logged as a warning and recorded) instead of rejecting it.
    """
    output = Path(output_dir)
    check_unique_names(models, sets)
    logger.info("Loading %d models", len(models))
    loaded: dict[str, tuple] = {}
    embedders = [Embedder(entry, loaded) for entry in models]
    warnings = [check_degradation(embedder, degradation, allow_degradation_mismatch) for embedder in embedders]

    logger.info("Loading %d sets", len(sets))
    face_sets = [load_set(config, output) for config in sets]
    for face_set in face_sets:
        face_set.check_sizes(sizes)
        warnings += check_prepared_degradation(face_set, embedders, degradation, allow_degradation_mismatch)

    rows: list[ResultRow] = []
    plots: list[str] = []
    for face_set in face_sets:
        logger.info("Scoring %s (%s, %d images)", face_set.name, face_set.task, len(face_set.images))
        scorer = SetScorer(face_set, hr_size, batch_size, num_workers)
        set_rows = []
        for embedder in embedders:
            name = embedder.entry.name
            if embedder.entry.input == "hr":
                set_rows.append(ResultRow(name, "hr", face_set.name, face_set.task, None,
                                          scorer.score(embedder, name, None), gallery_label(face_set, None)))
                continue
            for size in sizes:
                spec = dataclasses.replace(degradation, vlr_size=size, input_size=embedder.input_size)
                set_rows.append(ResultRow(name, "vlr", face_set.name, face_set.task, size,
                                          scorer.score(embedder, name, spec), gallery_label(face_set, size)))
        for row in set_rows:
            logger.info("%s, %s, %s: %s", row.model, row.set, row.size_label, row.result.summary())
        plots += plot_curves(face_set, set_rows, sizes, output)
        rows += set_rows

    data = {face_set.name: data_record(face_set) for face_set in face_sets}
    record = {
        **run_info(),
        "seed": degradation.seed,
        "degradation": degradation.to_dict(),
        "sizes": sizes,
        "hr_size": hr_size,
        "flip_fusion": FLIP_FUSION,
        "data": data,
        "data_sha256": hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest(),
        "models": [embedder.describe() for embedder in embedders],
        "degradation_mismatches_allowed": [warning for warning in warnings if warning],
        "results": [row.to_dict() for row in rows],
        "plots": plots,
    }
    write_json_atomic(record, output / "results.json")
    report = format_report(rows, data, record)
    write_text_atomic(report, output / "results.md")
    print(report)
    print(f"Wrote {output / 'results.json'}, {output / 'results.md'} and {len(plots)} plots to {output}")
    return record


def main(argv: list[str]) -> None:
    arguments = parse_function_arguments(evaluate, "lvlrfr evaluate", __doc__.split("\n\n")[0], argv)
    arguments["models"] = [entry if isinstance(entry, ModelEntry) else ModelEntry(**entry) for entry in arguments["models"]]
    arguments["sets"] = [item if isinstance(item, EvaluationSet) else EvaluationSet(**item) for item in arguments["sets"]]
    if isinstance(arguments["degradation"], dict):
        arguments["degradation"] = Degradation.from_dict(arguments["degradation"])
    evaluate(**arguments)
