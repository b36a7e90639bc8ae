"""Measure training epochs of stages 1 and 2 with and without the teacher cache, and write a Markdown report.

Example::

    python -m lvlrfr.benchmarks --output docs/benchmarks.md

Each stage trains twice from the same seed on the same LFW subset: once running its frozen teacher
in every step, once reading the teacher's outputs from a cache built before the first epoch. The
report gives the time of each epoch, the cache build time and size, and the first-batch losses of
both runs, which must agree (float16 taps: rtol 1e-2, float32 embeddings: rtol 1e-4). Weights are
random because the speed of a network does not depend on its training. The speed-up compares the
fastest epoch of each run, since other processes on the machine can only make an epoch slower.

Each stage runs with two teachers. The small ones are those of the CPU profile. The large ones have
the size of the teachers of a full-scale run: the GPU profile's diffusion UNet (at the CPU profile's
32-pixel sample size) and an iResNet-50 exported to ONNX in the layout of insightface's
``w600k_r50.onnx``. The cache saves the teacher's share of an epoch, so the two show the range.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
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
from lvlrfr.models import iresnet
from lvlrfr.stages import DiscriminativeDistillation, GenerativeDistillation
from lvlrfr.teachers.diffusion import DiffusionSRTeacher
from lvlrfr.utils.run_info import git_commit, write_text_atomic

logger = logging.getLogger(__name__)

# The CPU profile (configs/sr_teacher.yaml, generative.yaml, discriminative.yaml, data_cpu.yaml).
SR_TEACHERS = {
    "cpu": {"sample_size": 32, "block_out_channels": [32, 64, 64], "layers_per_block": 1, "norm_num_groups": 16},
    # configs/gpu/sr_teacher.yaml at the CPU profile's sample size.
    "gpu": {"sample_size": 32, "block_out_channels": [64, 128, 256, 256], "layers_per_block": 2, "norm_num_groups": 32},
}
SHARED_RECOGNIZER = "../shared/models/mobilefacenet/mobilefacenet_arcface.onnx"
STUDENT = {"arch": "iresnet", "input_size": 32, "depths": [2, 2, 2], "widths": [32, 64, 128]}
DEGRADATION = Degradation(vlr_size=16, input_size=32, down_kernel="area", up_kernel="bicubic", seed=0)
LOSS_TOLERANCE = {"generative": 1e-2, "discriminative": 1e-4}
WORK_DIR_MARKER = ".lvlrfr-benchmark"


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
    label: str = ""
    """Short teacher name for the second table."""

    @property
    def speedup(self) -> float:
        """Ratio of the fastest epochs without and with the cache."""
        return min(self.plain.epoch_seconds) / min(self.cached.epoch_seconds)

    @property
    def break_even_epochs(self) -> str:
        """Epochs after which the time saved by the cache exceeds its build time, or "never"."""
        saved = min(self.plain.epoch_seconds) - min(self.cached.epoch_seconds)
        return "never" if saved <= 0 else f"{math.ceil(self.cached.cache_build_seconds / saved)}"

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


def save_sr_teacher(work: Path, preset: str = "cpu") -> Path:
    """Save a randomly initialised SR teacher of ``SR_TEACHERS[preset]`` with ``save_pretrained``; return its folder."""
    torch.manual_seed(0)
    return DiffusionSRTeacher(**SR_TEACHERS[preset]).save_pretrained(work / f"sr_teacher_{preset}")


def export_iresnet50(work: Path) -> Path:
    """Export a randomly initialised iResNet-50 to ONNX like insightface's ``w600k_r50.onnx``; return the file.

    Input ``(B, 3, 112, 112)`` RGB ``(pixel - 127.5) / 127.5``, output a 512-d embedding, dynamic batch.
    """
    torch.manual_seed(0)
    network = iresnet("iresnet50").eval()
    path = work / "iresnet50" / "w600k_r50.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    logger.info("Exporting a random iResNet-50 to %s", path)
    torch.onnx.export(
        network, (torch.zeros(2, 3, 112, 112),), str(path), input_names=["input.1"], output_names=["embedding"],
        dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True, opset_version=17,
    )
    return path


def parameter_count(module: torch.nn.Module) -> str:
    return f"{sum(parameter.numel() for parameter in module.parameters()) / 1e6:.1f} M parameters"


def onnx_parameter_count(path: Path) -> str:
    """Count the weights of an ONNX graph (its initializers)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return f"{sum(int(np.prod(tensor.dims)) for tensor in graph.initializer) / 1e6:.1f} M parameters"


def save_stage1_checkpoint(work: Path, teacher_folder: Path) -> Path:
    """Write a stage 1 checkpoint (backbone weights and hyper-parameters) of an untrained student for stage 2."""
    torch.manual_seed(0)
    module = GenerativeDistillation(str(teacher_folder), **STUDENT)
    path = work / "generative.ckpt"
    hyper_parameters = {**dict(module.hparams), "degradation": DEGRADATION.to_dict()}
    torch.save({"hyper_parameters": hyper_parameters, "state_dict": module.state_dict()}, path)
    return path


def benchmark_generative(arguments: argparse.Namespace, work: Path, preset: str) -> Comparison:
    """Compare stage 1 epochs with and without the tap cache, with the SR teacher ``SR_TEACHERS[preset]``."""
    teacher_folder = save_sr_teacher(work, preset)

    def factory(cache: str | None) -> GenerativeDistillation:
        return GenerativeDistillation(str(teacher_folder), **STUDENT, teacher_cache=cache)

    logger.info("Stage 1 with the %s-profile SR teacher, without the teacher cache", preset)
    plain = train(factory, arguments, None, "sr_teacher.encode")
    logger.info("Stage 1 with the %s-profile SR teacher, with the teacher cache", preset)
    cached = train(factory, arguments, work / f"cache_generative_{preset}", "sr_teacher.encode")
    config = SR_TEACHERS[preset]
    teacher = (
        f"{preset.upper()}-profile diffusion SR teacher: UNet {config['block_out_channels']} x "
        f"{plural(config['layers_per_block'], 'layer')} per block, sample size {config['sample_size']}, "
        f"{parameter_count(factory(None).sr_teacher)}"
    )
    return Comparison("generative", teacher, plain, cached, f"{preset.upper()}-profile UNet")


def benchmark_discriminative(
    arguments: argparse.Namespace, work: Path, student_checkpoint: Path, recognizer: Path, spec: str, description: str,
    label: str,
) -> Comparison:
    """Compare stage 2 epochs with and without the embedding cache, with ``recognizer`` on onnxruntime."""

    def factory(cache: str | None) -> DiscriminativeDistillation:
        return DiscriminativeDistillation(
            str(student_checkpoint), str(recognizer), spec, recognizer_backend="onnxruntime", teacher_cache=cache
        )

    logger.info("Stage 2 with %s, without the teacher cache", recognizer.name)
    plain = train(factory, arguments, None, "recognizer.forward")
    logger.info("Stage 2 with %s, with the teacher cache", recognizer.name)
    cached = train(factory, arguments, work / f"cache_discriminative_{recognizer.stem}", "recognizer.forward")
    return Comparison("discriminative", f"{description} ({spec} spec), onnxruntime", plain, cached, label)


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
        *teacher_overview(comparisons),
        "",
        f"Command: `{command}` (`make bench` runs it with the defaults), git commit `{git_commit()}`, "
        f"{time.strftime('%Y-%m-%d', time.gmtime())}.",
        "",
        f"Machine: {cpu_model()}, {os.cpu_count()} logical CPUs, torch {torch.__version__} with "
        f"{plural(torch.get_num_threads(), 'intra-op thread')}, Python {platform.python_version()}, no GPU. "
        f"The benchmark ran at niceness {os.nice(0)}, and the load average (1, 5, 15 min) when it started was "
        f"{', '.join(f'{value:.2f}' for value in load_before)}. Other processes on the same CPUs slow both runs "
        "and change the ratio.",
        "",
        f"Data: {arguments.images} aligned LFW training images from `{arguments.train_root}`, batch {arguments.batch_size} "
        f"(last partial batch dropped), {plural(arguments.num_workers, 'data-loader worker')}, degradation "
        f"{DEGRADATION.describe()}. Student: iResNet {STUDENT['widths']} x {STUDENT['depths']} at "
        f"{STUDENT['input_size']} px (CPU profile). Random weights. Each run trains {plural(arguments.epochs, 'epoch')} "
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
        "A cached epoch costs about what an uncached epoch costs without its teacher calls, so on an otherwise idle "
        "machine the speed-up is close to 1 / (1 - share), where share is the teacher's part of an uncached epoch. "
        "The table gives the time spent in the teacher's calls during each uncached epoch, measured inside those "
        "epochs, and compares the rest of the fastest uncached epoch with the fastest cached one.",
        "",
        "| stage | teacher | teacher time per uncached epoch (s) | teacher share of the epoch | uncached epoch without "
        "the teacher, fastest (s) | cached epoch, fastest (s) | 1 / (1 - share), fastest epoch | measured speed-up "
        "| epochs that repay the cache build |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for comparison in comparisons:
        plain = comparison.plain
        shares = comparison.teacher_shares
        fastest = plain.epoch_seconds.index(min(plain.epoch_seconds))
        bound = "-" if shares[fastest] >= 1 else f"{1 / (1 - shares[fastest]):.2f}x"
        lines.append(
            f"| {comparison.stage} | {comparison.label} | "
            f"{', '.join(f'{s:.1f}' for s in plain.teacher_seconds)} | {', '.join(f'{share:.0%}' for share in shares)} | "
            f"{plain.epoch_seconds[fastest] - plain.teacher_seconds[fastest]:.1f} | "
            f"{min(comparison.cached.epoch_seconds):.1f} | {bound} | {comparison.speedup:.2f}x | "
            f"{comparison.break_even_epochs} |"
        )
    lines += [
        "",
        "What remains of a cached epoch is the student's forward and backward passes and its losses. The data "
        "loading leaves the epoch too, because the training set then reads the stored VLR face and label of each "
        "item instead of decoding, resizing and degrading its HR image. The student's part costs the same with both "
        "teachers of a stage, so the larger the teacher, the larger the gain. With a data-loader worker on the "
        "same CPUs, the worker decodes the next batch while the teacher runs and slows the teacher's calls, so the "
        "share, and with it 1 / (1 - share), comes out somewhat too high.",
        "",
        "The cache build runs the teacher once on every training image and its horizontal flip, about two epochs "
        "of teacher calls. The last column divides the build time by the time the cache saves per epoch (fastest "
        "epochs): from that epoch on a run is faster overall, and later runs with the same teacher, data and "
        "degradation reuse the cache.",
        "",
    ]
    slower = [f"{comparison.stage} with the {comparison.label}" for comparison in comparisons if comparison.speedup < 1]
    if slower:
        lines += [
            f"**Warning:** the cached epochs were slower in {', '.join(slower)}. Other processes were probably using "
            "the CPUs (see the load averages); rerun the benchmark on an idle machine.",
            "",
        ]
    return "\n".join(lines)


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def teacher_overview(comparisons: list[Comparison]) -> list[str]:
    """Return the paragraph that names the teachers measured and why they were chosen."""
    text = (
        "Each row trains one stage with one teacher, described in the first table. The cache saves the teacher's "
        "calls, so its gain grows with the teacher's size."
    )
    large = {"GPU-profile UNet", "iResNet-50"} & {comparison.label for comparison in comparisons}
    if large:
        text += (
            " Besides the CPU profile's small teachers, the benchmark measures two teachers of a full-scale run's "
            "size. For stage 1 it uses the UNet widths of `configs/gpu/sr_teacher.yaml` at the CPU profile's 32-pixel "
            "sample size. For stage 2 it uses an iResNet-50 exported to ONNX as insightface's `w600k_r50.onnx`, the "
            "usual HR teacher of the field."
        )
    return [text]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lvlrfr.benchmarks", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--output", default="docs/benchmarks.md", help="Markdown report to write")
    parser.add_argument("--train-root", default="../shared/data/lfw-112x112", help="identity-folder tree of aligned faces")
    parser.add_argument("--recognizer", default=SHARED_RECOGNIZER, help="ONNX file of the 'shared' stage 2 HR teacher")
    parser.add_argument("--recognizer-spec", default="mobilefacenet_arcface", help="spec preset of --recognizer")
    parser.add_argument(
        "--sr-teachers", nargs="+", default=list(SR_TEACHERS), choices=list(SR_TEACHERS),
        help="stage 1 teachers: the CPU profile's, and the GPU profile's widths at 32 px",
    )
    parser.add_argument(
        "--recognizers", nargs="+", default=["shared", "iresnet50"], choices=("shared", "iresnet50"),
        help="stage 2 teachers: --recognizer, and a random iResNet-50 exported like w600k_r50.onnx",
    )
    parser.add_argument("--images", type=int, default=512, help="training images (an evenly spaced subset)")
    parser.add_argument("--batch-size", type=int, default=64, help="training batch size")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run; the speed-up uses the fastest one")
    parser.add_argument("--num-workers", type=int, default=1, help="data-loader worker processes")
    parser.add_argument(
        "--work-dir", default="runs/benchmarks",
        help="scratch folder for teachers and caches; emptied at the start, so it must be new, empty or made by this benchmark",
    )
    parser.add_argument(
        "--stages", nargs="+", default=["generative", "discriminative"], choices=("generative", "discriminative"),
        help="stages to measure",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # The ONNX exporter logs every graph rewrite at INFO.
    for name in ("onnx_ir", "onnxscript"):
        logging.getLogger(name).setLevel(logging.WARNING)
    load_before = os.getloadavg()
    work = Path(arguments.work_dir)
    marker = work / WORK_DIR_MARKER
    if work.exists() and any(work.iterdir()) and not marker.is_file():
        print(
            f"--work-dir {work} is not empty and was not created by this benchmark, which empties its work folder; "
            "give a new or empty folder",
            file=sys.stderr,
        )
        return 2
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    marker.write_text("Scratch folder of python -m lvlrfr.benchmarks; emptied by every run.\n")

    comparisons = []
    if "generative" in arguments.stages:
        for preset in arguments.sr_teachers:
            comparisons.append(benchmark_generative(arguments, work, preset))
    if "discriminative" in arguments.stages:
        student_checkpoint = save_stage1_checkpoint(work, save_sr_teacher(work))
        recognizers = []
        if "shared" in arguments.recognizers:
            shared = Path(arguments.recognizer)
            description = f"`{shared.name}`, {onnx_parameter_count(shared)}"
            recognizers.append((shared, arguments.recognizer_spec, description, shared.stem))
        if "iresnet50" in arguments.recognizers:
            exported = export_iresnet50(work)
            description = f"iResNet-50 in the layout of `w600k_r50.onnx`, {onnx_parameter_count(exported)}"
            recognizers.append((exported, "w600k_r50", description, "iResNet-50"))
        for recognizer, spec, description, label in recognizers:
            comparisons.append(
                benchmark_discriminative(arguments, work, student_checkpoint, recognizer, spec, description, label)
            )

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
