"""Measure training epochs of stages 1 and 2 with and without the teacher cache, and write a Markdown report.

Example::

    python -m lvlrfr.benchmarks --output docs/benchmarks.md

Each stage trains twice from the same seed on the same LFW subset: once running its frozen teacher
in every step, once reading the teacher's outputs from a cache built before the first epoch. The
report gives the time of each epoch, the cache build time and size, and the first-batch losses of
both runs, which must agree (float16 taps: rtol 1e-2, float32 embeddings: rtol 1e-4). Weights are
random because the speed of a network does not depend on its training. The speed-up compares the
fastest epoch of each run, since other processes on the machine can only make an epoch slower.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from lvlrfr.data.datamodule import LowResFaceDataModule
from lvlrfr.data.degradation import Degradation
from lvlrfr.stages import DiscriminativeDistillation, GenerativeDistillation
from lvlrfr.teachers.diffusion import DiffusionSRTeacher
from lvlrfr.utils.run_info import git_commit, write_text_atomic

logger = logging.getLogger(__name__)

# The CPU profile (configs/sr_teacher.yaml, generative.yaml, discriminative.yaml, data_cpu.yaml).
SR_TEACHER = {"sample_size": 32, "block_out_channels": [32, 64, 64], "layers_per_block": 1, "norm_num_groups": 16}
STUDENT = {"arch": "iresnet", "input_size": 32, "depths": [2, 2, 2], "widths": [32, 64, 128]}
DEGRADATION = Degradation(vlr_size=16, input_size=32, down_kernel="area", up_kernel="bicubic", seed=0)
LOSS_TOLERANCE = {"generative": 1e-2, "discriminative": 1e-4}


class EpochTimer(L.Callback):
    """Records the wall time of each training epoch, the time spent in the teacher, and the first-batch loss.

    ``teacher_method`` (``"sr_teacher.encode"``, ``"recognizer.forward"``) is wrapped at the start of training,
    so its time is measured inside the same epochs, under the same machine load.
    """

    def __init__(self, teacher_method: str) -> None:
        self.teacher_method = teacher_method
        self.epoch_seconds: list[float] = []
        self.teacher_seconds: list[float] = []
        self.first_loss: float | None = None
        self._start = 0.0

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        owner_name, method_name = self.teacher_method.split(".")
        owner = getattr(module, owner_name)
        original = getattr(owner, method_name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.teacher_seconds[-1] += time.perf_counter() - start

        setattr(owner, method_name, timed)

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.teacher_seconds.append(0.0)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if self.first_loss is None:
            self.first_loss = float(outputs["loss"])

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.epoch_seconds.append(time.perf_counter() - self._start)


@dataclass
class Run:
    """One training run: epoch times, first-batch loss and, with a cache, its build time and size."""

    epoch_seconds: list[float]
    teacher_seconds: list[float]
    first_loss: float
    steps_per_epoch: int
    load_average: tuple[float, float]
    cache_build_seconds: float | None = None
    cache_megabytes: float | None = None


@dataclass
class Comparison:
    stage: str
    teacher: str
    plain: Run
    cached: Run

    @property
    def speedup(self) -> float:
        """Ratio of the fastest epochs without and with the cache."""
        return min(self.plain.epoch_seconds) / min(self.cached.epoch_seconds)

    @property
    def teacher_shares(self) -> list[float]:
        """Fraction of each uncached epoch spent in the teacher."""
        return [teacher / epoch for teacher, epoch in zip(self.plain.teacher_seconds, self.plain.epoch_seconds)]

    @property
    def losses_match(self) -> bool:
        return bool(np.isclose(self.cached.first_loss, self.plain.first_loss, rtol=LOSS_TOLERANCE[self.stage], atol=0))


def make_datamodule(arguments: argparse.Namespace) -> LowResFaceDataModule:
    return LowResFaceDataModule(
        train_root=arguments.train_root,
        pairs_file=None,
        degradation=DEGRADATION,
        batch_size=arguments.batch_size,
        num_workers=arguments.num_workers,
        max_train_images=arguments.images,
    )


def train(module_factory, arguments: argparse.Namespace, cache: Path | None, teacher_method: str) -> Run:
    """Train one run from seed 0 for ``arguments.epochs`` epochs without validation or checkpoints."""
    L.seed_everything(0, verbose=False)
    load_at_start = os.getloadavg()[0]
    module = module_factory(str(cache) if cache else None)
    timer = EpochTimer(teacher_method)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=arguments.epochs, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        callbacks=[timer], default_root_dir=arguments.work_dir,
    )
    trainer.fit(module, datamodule=make_datamodule(arguments))
    run = Run(
        timer.epoch_seconds, timer.teacher_seconds, timer.first_loss, trainer.num_training_batches,
        (load_at_start, os.getloadavg()[0]),
    )
    if cache is not None:
        meta = json.loads(next(cache.glob("*/meta.json")).read_text())
        run.cache_build_seconds, run.cache_megabytes = meta["build_seconds"], meta["bytes"] / 2**20
    return run


def save_sr_teacher(work: Path) -> Path:
    """Save a randomly initialised CPU-profile SR teacher with ``save_pretrained``; return its folder."""
    torch.manual_seed(0)
    return DiffusionSRTeacher(**SR_TEACHER).save_pretrained(work / "sr_teacher")


def save_stage1_checkpoint(work: Path, teacher_folder: Path) -> Path:
    """Write a stage 1 checkpoint (backbone weights and hyper-parameters) of an untrained student for stage 2."""
    torch.manual_seed(0)
    module = GenerativeDistillation(str(teacher_folder), **STUDENT)
    path = work / "generative.ckpt"
    hyper_parameters = {**dict(module.hparams), "degradation": DEGRADATION.to_dict()}
    torch.save({"hyper_parameters": hyper_parameters, "state_dict": module.state_dict()}, path)
    return path


def benchmark_generative(arguments: argparse.Namespace, work: Path, teacher_folder: Path) -> Comparison:
    """Compare stage 1 epochs with and without the tap cache."""

    def factory(cache: str | None) -> GenerativeDistillation:
        return GenerativeDistillation(str(teacher_folder), **STUDENT, teacher_cache=cache)

    logger.info("Stage 1 without the teacher cache")
    plain = train(factory, arguments, None, "sr_teacher.encode")
    logger.info("Stage 1 with the teacher cache")
    cached = train(factory, arguments, work / "cache_generative", "sr_teacher.encode")
    teacher = f"diffusion SR teacher, UNet {SR_TEACHER['block_out_channels']}, sample size {SR_TEACHER['sample_size']}"
    return Comparison("generative", teacher, plain, cached)


def benchmark_discriminative(arguments: argparse.Namespace, work: Path, student_checkpoint: Path) -> Comparison:
    """Compare stage 2 epochs with and without the embedding cache, with the real recognizer on onnxruntime."""

    def factory(cache: str | None) -> DiscriminativeDistillation:
        return DiscriminativeDistillation(
            str(student_checkpoint), arguments.recognizer, arguments.recognizer_spec, recognizer_backend="onnxruntime",
            teacher_cache=cache,
        )

    logger.info("Stage 2 without the teacher cache")
    plain = train(factory, arguments, None, "recognizer.forward")
    logger.info("Stage 2 with the teacher cache")
    cached = train(factory, arguments, work / "cache_discriminative", "recognizer.forward")
    teacher = f"{Path(arguments.recognizer).name} ({arguments.recognizer_spec}), onnxruntime"
    return Comparison("discriminative", teacher, plain, cached)


def cpu_model() -> str:
    """Return the CPU model name from /proc/cpuinfo, or platform.processor() elsewhere."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def format_report(comparisons: list[Comparison], arguments: argparse.Namespace, load_before: tuple[float, float, float]) -> str:
    command = " ".join(["python -m lvlrfr.benchmarks", shlex.join(sys.argv[1:])]).strip()
    lines = [
        "# Benchmarks",
        "",
        "## Teacher cache: training epochs with and without it",
        "",
        f"Command: `{command}` (`make bench` runs it with the defaults), git commit `{git_commit()}`, "
        f"{time.strftime('%Y-%m-%d', time.gmtime())}.",
        "",
        f"Machine: {cpu_model()}, {os.cpu_count()} logical CPUs, torch {torch.__version__} with "
        f"{torch.get_num_threads()} intra-op threads, Python {platform.python_version()}, no GPU. "
        f"The benchmark ran at niceness {os.nice(0)}, and the load average (1, 5, 15 min) when it started was "
        f"{', '.join(f'{value:.2f}' for value in load_before)}. Other processes on the same CPUs slow both runs "
        "and change the ratio.",
        "",
        f"Data: {arguments.images} aligned LFW training images from `{arguments.train_root}`, batch {arguments.batch_size} "
        f"(last partial batch dropped), {arguments.num_workers} data-loader worker(s), degradation "
        f"{DEGRADATION.describe()}. Student: iResNet {STUDENT['widths']} x {STUDENT['depths']} at "
        f"{STUDENT['input_size']} px (CPU profile). Random weights. Each run trains {arguments.epochs} epoch(s) "
        "from seed 0 without validation. The speed-up compares the fastest epoch of each run, because other "
        "processes can only make an epoch slower.",
        "",
        "| stage | teacher | steps per epoch | epochs without cache (s) | epochs with cache (s) | speed-up | cache build (s) "
        "| cache size (MiB) | first-batch loss without / with | 1-min load average at start and end, without / with |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for comparison in comparisons:
        plain, cached = comparison.plain, comparison.cached
        match = "match" if comparison.losses_match else "**differ**"
        lines.append(
            f"| {comparison.stage} | {comparison.teacher} | {plain.steps_per_epoch} | "
            f"{', '.join(f'{s:.1f}' for s in plain.epoch_seconds)} | "
            f"{', '.join(f'{s:.1f}' for s in cached.epoch_seconds)} | {comparison.speedup:.2f}x | "
            f"{cached.cache_build_seconds:.1f} | {cached.cache_megabytes:.1f} | "
            f"{plain.first_loss:.5f} / {cached.first_loss:.5f} ({match}) | "
            f"{plain.load_average[0]:.1f}-{plain.load_average[1]:.1f} / {cached.load_average[0]:.1f}-{cached.load_average[1]:.1f} |"
        )
    lines += [
        "",
        "A cache removes only the teacher's share of a step. The student's forward and backward passes, the "
        "losses and the data loading remain, so on an otherwise idle machine an epoch gets about 1 / (1 - share) "
        "times faster. The table gives the time spent in the teacher's calls during each uncached epoch, measured "
        "inside those epochs.",
        "",
        "| stage | teacher time per uncached epoch (s) | teacher share of the epoch | 1 / (1 - share), fastest epoch |",
        "|---|---|---|---|",
    ]
    for comparison in comparisons:
        shares = comparison.teacher_shares
        fastest = shares[comparison.plain.epoch_seconds.index(min(comparison.plain.epoch_seconds))]
        bound = "-" if fastest >= 1 else f"{1 / (1 - fastest):.2f}x"
        lines.append(
            f"| {comparison.stage} | {', '.join(f'{s:.1f}' for s in comparison.plain.teacher_seconds)} | "
            f"{', '.join(f'{share:.0%}' for share in shares)} | {bound} |"
        )
    lines += [
        "",
        "The cache build runs the teacher once on every training image and its horizontal flip, so it costs about "
        "two epochs of teacher time. It pays off from the third epoch on, and later runs with the same teacher, "
        "data and degradation reuse it.",
        "",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lvlrfr.benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="docs/benchmarks.md", help="Markdown report to write")
    parser.add_argument("--train-root", default="../shared/data/lfw-112x112", help="identity-folder tree of aligned faces")
    parser.add_argument(
        "--recognizer", default="../shared/models/mobilefacenet/mobilefacenet_arcface.onnx", help="stage 2 HR teacher"
    )
    parser.add_argument("--recognizer-spec", default="mobilefacenet_arcface", help="spec preset of the HR teacher")
    parser.add_argument("--images", type=int, default=512, help="training images (an evenly spaced subset)")
    parser.add_argument("--batch-size", type=int, default=64, help="training batch size")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run; the speed-up uses the fastest one")
    parser.add_argument("--num-workers", type=int, default=1, help="data-loader worker processes")
    parser.add_argument("--work-dir", default="runs/benchmarks", help="scratch folder, emptied at the start")
    parser.add_argument("--stages", nargs="+", default=["generative", "discriminative"], choices=("generative", "discriminative"))
    return parser


def main(argv: list[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    load_before = os.getloadavg()
    work = Path(arguments.work_dir)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)

    comparisons = []
    teacher_folder = save_sr_teacher(work)
    if "generative" in arguments.stages:
        comparisons.append(benchmark_generative(arguments, work, teacher_folder))
    if "discriminative" in arguments.stages:
        student_checkpoint = save_stage1_checkpoint(work, teacher_folder)
        comparisons.append(benchmark_discriminative(arguments, work, student_checkpoint))

    report = format_report(comparisons, arguments, load_before)
    write_text_atomic(report, arguments.output)
    print(report)
    mismatched = [comparison.stage for comparison in comparisons if not comparison.losses_match]
    if mismatched:
        print(f"First-batch losses differ with and without the cache in {mismatched}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
