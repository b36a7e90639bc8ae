"""``lvlrfr evaluate``: score students and teachers on verification sets at several resolutions.

Example::

    lvlrfr evaluate --config configs/evaluate.yaml
    lvlrfr evaluate --config configs/evaluate.yaml --sizes '[16, 12, 8]'

Each model embeds every image of a set and its horizontal flip (embeddings summed), pairs are scored
by cosine similarity, and accuracy is reported per fold with the threshold chosen on the other
evaluated folds. The run writes ``results.json`` (with command, git commit, seed, degradation and
data manifest), ``results.md`` and one ROC plot per resolution to ``output_dir``.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from jsonargparse import ArgumentParser, ActionConfigFile
from torch.utils.data import DataLoader
from tqdm import tqdm

from lvlrfr.data.datamodule import EvaluationFaces
from lvlrfr.data.degradation import Degradation
from lvlrfr.data.sources.lfw import read_lfw_pairs
from lvlrfr.evaluation.plots import plot_roc
from lvlrfr.evaluation.report import format_table
from lvlrfr.evaluation.verification import cosine_scores, fuse_flip, kfold_verification
from lvlrfr.stages.export import load_student
from lvlrfr.teachers.recognizer import load_recognizer
from lvlrfr.utils.errors import ConfigurationError
from lvlrfr.utils.run_info import run_info, write_json_atomic, write_text_atomic

logger = logging.getLogger(__name__)


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
            input size; ``hr`` scores it on the HR faces (one figure, the same at every size).
    """

    name: str
    checkpoint: str | None = None
    recognizer: str | None = None
    spec: str | dict[str, Any] | None = None
    backend: Literal["auto", "torch", "onnxruntime"] = "auto"
    input: Literal["vlr", "hr"] = "vlr"


@dataclass
class VerificationSet:
    """A verification set: LFW-style ``pairs.txt`` over an identity-folder tree, restricted to ``folds``."""

    name: str = "lfw"
    pairs_file: str = "../shared/data/lfw-112x112/pairs.txt"
    root: str = "../shared/data/lfw-112x112"
    folds: list[int] = field(default_factory=lambda: [6, 7, 8, 9, 10])


class Embedder:
    """A loaded model with what it needs as input: ``(B, 3, input_size, input_size)`` in [-1, 1]."""

    def __init__(self, entry: ModelEntry) -> None:
        if (entry.checkpoint is None) == (entry.recognizer is None):
            raise ConfigurationError(f"model {entry.name!r}: set exactly one of checkpoint and recognizer")
        self.entry = entry
        self.degradation: Degradation | None = None
        if entry.checkpoint is not None:
            self.network, hparams = load_student(entry.checkpoint)
            self.input_size = int(hparams["backbone"]["input_size"])
            if hparams.get("degradation") is not None:
                self.degradation = Degradation.from_dict(dict(hparams["degradation"]))
        else:
            self.network = load_recognizer(entry.recognizer, entry.spec, backend=entry.backend)
            self.input_size = int(self.network.spec.input_size)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        embeddings = self.network(images).float()
        flipped = self.network(torch.flip(images, dims=[3])).float()
        return fuse_flip(embeddings, flipped)


def check_degradation(embedder: Embedder, degradation: Degradation, allow_mismatch: bool) -> None:
    """Reject scoring a student on a degradation other than the one it was trained on (except the size)."""
    if embedder.degradation is None:
        return
    trained = {**embedder.degradation.to_dict(), "vlr_size": None, "input_size": None}
    requested = {**degradation.to_dict(), "vlr_size": None, "input_size": None}
    if trained == requested:
        return
    difference = {key: (trained[key], requested[key]) for key in trained if trained[key] != requested[key]}
    message = (
        f"model {embedder.entry.name!r} was trained on degradation {embedder.degradation.to_dict()} but the "
        f"evaluation uses {degradation.to_dict()} (trained vs requested: {difference}); set the evaluation "
        "degradation to the training one, or pass --allow_degradation_mismatch true to score it anyway"
    )
    if not allow_mismatch:
        raise ConfigurationError(message)
    logger.warning("%s", message)


def embed_images(embedder: Embedder, dataset: EvaluationFaces, key: str, batch_size: int, workers: int, label: str) -> np.ndarray:
    """Embed every image of ``dataset`` (batch key ``hr`` or ``vlr``) and return ``(N, D)`` flip-fused embeddings."""
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, shuffle=False)
    embeddings = np.zeros((len(dataset), 0), dtype=np.float32)
    chunks = []
    for batch in tqdm(loader, desc=label, unit="batch", leave=False):
        chunks.append(embedder(batch[key]).numpy())
    if chunks:
        embeddings = np.concatenate(chunks)
    return embeddings


def evaluate(
    models: list[ModelEntry],
    sets: list[VerificationSet],
    degradation: Degradation,
    sizes: list[int],
    output_dir: str,
    hr_size: int = 112,
    batch_size: int = 128,
    num_workers: int = 2,
    allow_degradation_mismatch: bool = False,
) -> dict[str, Any]:
    """Score each model on each set at each size and write ``results.json``, ``results.md`` and ROC plots."""
    output = Path(output_dir)
    embedders = [Embedder(entry) for entry in models]
    for embedder in embedders:
        check_degradation(embedder, degradation, allow_degradation_mismatch)

    rows: list[dict[str, Any]] = []
    manifests = {}
    for verification_set in sets:
        protocol = read_lfw_pairs(verification_set.pairs_file, verification_set.root).select_folds(verification_set.folds)
        manifests[verification_set.name] = {**protocol.manifest(), "folds": verification_set.folds}
        curves: dict[int, dict[str, Any]] = {size: {} for size in sizes}
        for embedder in embedders:
            hr_result = None
            for size in sizes:
                spec = dataclasses.replace(degradation, vlr_size=size, input_size=embedder.input_size)
                dataset = EvaluationFaces(protocol, hr_size, spec)
                if embedder.entry.input == "hr" and hr_result is not None:
                    result = hr_result
                else:
                    label = f"{embedder.entry.name} on {verification_set.name}" + (
                        "" if embedder.entry.input == "hr" else f" at {size}px"
                    )
                    embeddings = embed_images(embedder, dataset, embedder.entry.input, batch_size, num_workers, label)
                    scores = cosine_scores(embeddings, protocol.pairs)
                    result = kfold_verification(scores, protocol.same, protocol.folds, flip_fusion="sum")
                    if embedder.entry.input == "hr":
                        hr_result = result
                curves[size][embedder.entry.name] = result
                rows.append(
                    {"model": embedder.entry.name, "input": embedder.entry.input, "set": verification_set.name,
                     "size": size, "result": result}
                )
                logger.info("%s, %s, %d px: %s", embedder.entry.name, verification_set.name, size, result.summary())
        for size, results in curves.items():
            plot_roc(results, output / f"roc_{verification_set.name}{size}.png")

    record = {
        **run_info(),
        "seed": degradation.seed,
        "degradation": degradation.to_dict(),
        "hr_size": hr_size,
        "data": manifests,
        "models": [dataclasses.asdict(entry) for entry in models],
        "results": [{**{k: v for k, v in row.items() if k != "result"}, **row["result"].to_dict()} for row in rows],
    }
    write_json_atomic(record, output / "results.json")
    table = format_table(rows, sizes)
    write_text_atomic(table + "\n", output / "results.md")
    print(table)
    print(f"\nWrote {output / 'results.json'}, {output / 'results.md'} and ROC plots to {output}")
    return record


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="lvlrfr evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with any of the options below")
    parser.add_function_arguments(evaluate)
    return parser


def main(argv: list[str]) -> None:
    parser = build_parser()
    config = parser.parse_args(argv)
    config = parser.instantiate_classes(config)
    arguments = config.as_dict() if hasattr(config, "as_dict") else dict(config)
    arguments.pop("config", None)
    arguments["models"] = [entry if isinstance(entry, ModelEntry) else ModelEntry(**entry) for entry in arguments["models"]]
    arguments["sets"] = [item if isinstance(item, VerificationSet) else VerificationSet(**item) for item in arguments["sets"]]
    if isinstance(arguments["degradation"], dict):
        arguments["degradation"] = Degradation.from_dict(arguments["degradation"])
    evaluate(**arguments)
