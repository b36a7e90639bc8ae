"""``lvlrfr teachers``: show what a teacher expects and returns, checked against its file.

Examples::

    lvlrfr teachers list-presets
    lvlrfr teachers describe --recognizer ../shared/models/faceplugin/fr_feature.onnx --spec faceplugin
    lvlrfr teachers describe --recognizer backbone.pth --spec '{architecture: iresnet50, embedding_size: 512}'
    lvlrfr teachers describe --sr-teacher runs/cpu/sr_teacher/checkpoints/final.ckpt --json

``describe`` loads the teacher through the same loaders as the training stages, so a spec that
disagrees with the file fails here with the same ``TeacherSpecError``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
import yaml

from lvlrfr.teachers.spec import (
    PRESETS_BY_FILE_NAME,
    PRESETS_BY_SHA256,
    SPEC_PRESETS,
    UNREADABLE_FIELDS,
    file_sha256,
    onnx_spec_fields,
)

SPEC_FIELDS = ("architecture", "input_size", "colour_order", "layout", "mean", "std", "embedding_size", "flip_fusion")


def parse_spec(text: str | None) -> str | dict[str, Any] | None:
    """Read ``--spec``: a preset name, or a YAML/JSON mapping of spec fields (``{preset: faceplugin, ...}``)."""
    if text is None:
        return None
    value = yaml.safe_load(text)
    if isinstance(value, dict):
        return value
    if isinstance(value, str):
        return value
    raise ValueError(f"--spec {text!r} is neither a preset name nor a mapping of spec fields")


def fields_read_from_file(path: Path) -> dict[str, str]:
    """Return ``{spec field: where the loader read it in the file}`` for the fields a file fixes."""
    if path.suffix == ".onnx":
        import onnx

        found = onnx_spec_fields(onnx.load(str(path), load_external_data=False))
        origins = {"layout": "graph input", "input_size": "graph input", "embedding_size": "graph output"}
        return {name: origin for name, origin in origins.items() if found[name] is not None}
    if path.suffix in (".pth", ".pt"):
        from lvlrfr.models.iresnet import describe_iresnet_state_dict
        from lvlrfr.teachers.recognizer import _read_state_dict

        if describe_iresnet_state_dict(_read_state_dict(path)) is not None:
            return {name: "state dict keys and shapes" for name in ("architecture", "input_size", "embedding_size")}
        return {}
    if path.suffix == ".ckpt":
        return {name: "checkpoint hyper-parameters" for name in ("architecture", "input_size", "embedding_size")}
    return {}


def count_onnx_weights(path: Path) -> int:
    """Return the number of values in an ONNX graph's initializers (weights and BatchNorm statistics)."""
    import onnx

    total = 0
    for tensor in onnx.load(str(path)).graph.initializer:
        count = 1
        for dim in tensor.dims:
            count *= dim
        total += count
    return total


def describe_recognizer(source: str, spec: str | dict[str, Any] | None, backend: str) -> dict[str, Any]:
    """Load a recognizer with its spec and return each spec field with the place it was checked against."""
    from lvlrfr.teachers.recognizer import load_recognizer

    teacher = load_recognizer(source, spec, backend=backend)
    path = Path(teacher.source)
    digest = file_sha256(path)
    known = PRESETS_BY_SHA256.get(digest)
    read = fields_read_from_file(path)

    parameters = sum(parameter.numel() for parameter in teacher.parameters())
    if parameters == 0 and path.suffix == ".onnx":
        parameters = count_onnx_weights(path)

    size = teacher.spec.input_size
    with torch.no_grad():
        measured = teacher(torch.zeros(1, 3, size, size)).shape[1]

    fields = []
    for name in SPEC_FIELDS:
        if name in read:
            checked = f"file ({read[name]})"
        elif name == "architecture" and path.suffix == ".onnx":
            checked = "spec only: the ONNX graph defines the network"
        elif name in UNREADABLE_FIELDS and known is not None:
            checked = f"preset {known!r} recorded for this file's sha256"
        elif name in UNREADABLE_FIELDS:
            checked = "spec only: no model file stores it, check the model's documentation"
        else:
            checked = "spec only"
        fields.append({"field": name, "value": getattr(teacher.spec, name), "checked_against": checked})
    return {
        "source": str(path),
        "format": path.suffix.lstrip("."),
        "network": type(teacher.network).__name__,
        "sha256": digest,
        "known_file": known,
        "parameters": parameters,
        "fields": fields,
        "model_kwargs": teacher.spec.model_kwargs,
        "output_size": teacher.output_size,
        "measured_output_size": int(measured),
    }


def describe_sr_teacher(source: str) -> dict[str, Any]:
    """Load a diffusion SR teacher (stage 0a ``.ckpt``, ``save_pretrained`` folder or hub id) and describe it."""
    from lvlrfr.stages.generative import load_sr_teacher
    from lvlrfr.teachers.cache_entries import module_sha256

    teacher = load_sr_teacher(source)
    return {
        "source": source,
        **teacher.describe(),
        "noise_key": "2 * index + flipped (one noise draw per training image and flip)",
        "weights_sha256": module_sha256(teacher),
    }


def format_recognizer(description: dict[str, Any]) -> str:
    lines = [
        f"Recognizer {description['source']}",
        f"  format       {description['format']}, run by {description['network']}",
        f"  sha256       {description['sha256']}",
        f"  known file   {description['known_file'] or 'no (colour order, mean and std come from the spec alone)'}",
        f"  parameters   {description['parameters']:,}",
        "",
    ]
    rows = [("field", "value", "checked against")]
    rows += [(row["field"], str(row["value"]), row["checked_against"]) for row in description["fields"]]
    widths = [max(len(row[column]) for row in rows) for column in range(2)]
    lines += [f"  {row[0].ljust(widths[0])}  {row[1].ljust(widths[1])}  {row[2]}" for row in rows]
    lines.append("")
    if description["model_kwargs"]:
        lines.append(f"  model_kwargs {description['model_kwargs']}")
    lines.append(
        f"  output: ({description['output_size']},) float32 per image; a blank test image gave "
        f"{description['measured_output_size']} values"
    )
    return "\n".join(lines)


def format_sr_teacher(description: dict[str, Any]) -> str:
    lines = [
        f"Diffusion SR teacher {description['source']}",
        f"  conditioning    {description['conditioning']}",
        f"  sample_size     {description['sample_size']} px, VLR resized with up_kernel={description['up_kernel']}, "
        f"HR with hr_kernel={description['hr_kernel']}",
        f"  condition_on_hr {description['condition_on_hr']}",
        f"  tap timestep    {description['tap_timestep']} of {description['num_train_timesteps']}",
        f"  noise           seed {description['noise_seed']}, key {description['noise_key']}",
        f"  UNet            block_out_channels={description['block_out_channels']}, "
        f"down_block_types={description['down_block_types']}, {description['parameters']:,} parameters",
        f"  weights sha256  {description['weights_sha256']}",
        "  taps (C, H, W) per image:",
    ]
    lines += [f"    {name:6s} {tuple(shape)}" for name, shape in description["taps"].items()]
    return "\n".join(lines)


def format_presets() -> str:
    files: dict[str, list[str]] = {}
    for file_name, preset in PRESETS_BY_FILE_NAME.items():
        files.setdefault(preset, []).append(file_name)
    for digest, preset in PRESETS_BY_SHA256.items():
        files.setdefault(preset, []).append(f"sha256 {digest[:12]}...")
    rows = [("preset", *SPEC_FIELDS, "files")]
    for name, spec in SPEC_PRESETS.items():
        rows.append((name, *(str(getattr(spec, field)) for field in SPEC_FIELDS), ", ".join(files.get(name, [])) or "-"))
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row[:-1], widths)) + "  " + row[-1] for row in rows
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lvlrfr teachers", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list-presets", help="list the recognizer spec presets and the files they are registered for")
    describe = commands.add_parser("describe", help="load a teacher, check its spec against the file and print it")
    describe.add_argument("--recognizer", help="recognizer: .onnx, arcface_torch .pth, project .ckpt or insightface model name")
    describe.add_argument("--spec", help="recognizer spec: a preset name or a YAML mapping such as '{preset: faceplugin}'")
    describe.add_argument(
        "--backend", default="auto", choices=("auto", "torch", "onnxruntime"), help="how to run an ONNX recognizer"
    )
    describe.add_argument("--sr-teacher", help="diffusion SR teacher: stage 0a .ckpt, save_pretrained folder or hub id")
    describe.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    return parser


def main(argv: list[str]) -> None:
    parser = build_parser()
    arguments = parser.parse_args(argv)
    if arguments.command == "list-presets":
        print(format_presets())
        return
    if arguments.recognizer is None and arguments.sr_teacher is None:
        parser.error("describe needs --recognizer, --sr-teacher or both")

    descriptions: dict[str, Any] = {}
    if arguments.recognizer is not None:
        descriptions["recognizer"] = describe_recognizer(arguments.recognizer, parse_spec(arguments.spec), arguments.backend)
    if arguments.sr_teacher is not None:
        descriptions["sr_teacher"] = describe_sr_teacher(arguments.sr_teacher)

    if arguments.json:
        print(json.dumps(descriptions, indent=2, default=str))
        return
    blocks = []
    if "recognizer" in descriptions:
        blocks.append(format_recognizer(descriptions["recognizer"]))
    if "sr_teacher" in descriptions:
        blocks.append(format_sr_teacher(descriptions["sr_teacher"]))
    print("\n\n".join(blocks))
