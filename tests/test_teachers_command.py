"""Tests of ``lvlrfr teachers``: presets table, recognizer and diffusion teacher descriptions, spec errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler

from lvlrfr.cli import main as lvlrfr_main
from lvlrfr.models import iresnet
from lvlrfr.teachers.diffusion import DiffusionSRTeacher, build_sr_unet
from lvlrfr.teachers.spec import SPEC_PRESETS

FACEPLUGIN = "faceplugin/fr_feature.onnx"
MOBILEFACENET = "mobilefacenet/mobilefacenet_arcface.onnx"


def run(capsys, *argv: str) -> str:
    lvlrfr_main(["teachers", *argv])
    return capsys.readouterr().out


def test_list_presets_table(capsys):
    lines = run(capsys, "list-presets").splitlines()

    assert lines[0].split()[:3] == ["preset", "architecture", "input_size"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert set(rows) == set(SPEC_PRESETS)
    assert rows["mobilefacenet_arcface"].split()[1:8] == ["mobilefacenet", "112", "RGB", "NHWC", "127.5", "128.0", "192"]
    assert "fr_feature.onnx" in rows["faceplugin"]
    assert "sha256 25c1d11c3fdc" in rows["mobilefacenet_arcface"]


def test_describe_real_recognizer_fields(capsys, shared_models):
    path = shared_models / FACEPLUGIN
    text = run(capsys, "describe", "--recognizer", str(path), "--spec", "faceplugin", "--backend", "onnxruntime")
    fields = {line.split()[0]: line for line in text.splitlines() if line.startswith("  ") and len(line.split()) > 2}

    assert "known file   faceplugin" in text
    assert fields["layout"].split()[1:3] == ["NCHW", "file"]
    assert fields["input_size"].split()[1:3] == ["112", "file"]
    assert fields["embedding_size"].split()[1:4] == ["512", "file", "(graph"]
    assert "preset 'faceplugin' recorded" in fields["colour_order"]
    assert "gave 512 values" in text


def test_describe_json_output(capsys, shared_models):
    text = run(capsys, "describe", "--recognizer", str(shared_models / MOBILEFACENET), "--json", "--backend", "onnxruntime")
    description = json.loads(text)["recognizer"]
    values = {row["field"]: row["value"] for row in description["fields"]}

    assert values["layout"] == "NHWC"
    assert values["std"] == 128.0
    assert description["measured_output_size"] == 192
    assert description["known_file"] == "mobilefacenet_arcface"
    assert 1_000_000 < description["parameters"] < 1_500_000


def test_describe_bgr_spec_fails(capsys, shared_models):
    spec = "{architecture: mobilefacenet, input_size: 112, colour_order: BGR, layout: NHWC, mean: 127.5, std: 128, embedding_size: 192}"

    with pytest.raises(SystemExit) as caught:
        lvlrfr_main(["teachers", "describe", "--recognizer", str(shared_models / MOBILEFACENET), "--spec", spec])
    error = capsys.readouterr().err

    assert caught.value.code == 2
    assert "colour_order  BGR" in error
    assert "{preset: mobilefacenet_arcface, colour_order: ...}" in error


def test_describe_state_dict_recognizer(capsys, tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "backbone.pth"
    torch.save(iresnet("iresnet18", width=0.125, input_size=32, num_features=24).state_dict(), path)

    description = json.loads(run(capsys, "describe", "--recognizer", str(path), "--json"))["recognizer"]
    checked = {row["field"]: row["checked_against"] for row in description["fields"]}

    assert checked["architecture"] == "file (state dict keys and shapes)"
    assert checked["colour_order"].startswith("spec only")
    assert description["known_file"] is None
    assert description["measured_output_size"] == 24


def test_describe_plain_diffusers_folder(capsys, tmp_path):
    torch.manual_seed(0)
    unet = build_sr_unet(16, [8, 16], 1, None, 4, 8)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    unet.save_pretrained(tmp_path / "teacher" / "unet")
    scheduler.save_pretrained(tmp_path / "teacher" / "scheduler")

    text = run(capsys, "describe", "--sr-teacher", str(tmp_path / "teacher"))
    loaded = DiffusionSRTeacher.from_pretrained(tmp_path / "teacher", noise_seed=3).eval()
    reference = DiffusionSRTeacher.from_modules(unet.eval(), scheduler, noise_seed=3)
    vlr = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        expected, actual = reference.encode(vlr), loaded.encode(vlr)

    assert "tap timestep    200 of 1000" in text
    assert "down0  (8, 16, 16)" in text
    assert "mid    (16, 8, 8)" in text
    for name in reference.tap_names:
        assert torch.equal(expected[name], actual[name]), f"tap {name} differs after save_pretrained"


def test_describe_sr_teacher_json(capsys, tmp_path):
    torch.manual_seed(0)
    teacher = DiffusionSRTeacher(sample_size=16, block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4,
                                 tap_timestep=350, noise_seed=9, up_kernel="bilinear")
    folder = teacher.save_pretrained(tmp_path / "teacher")

    description = json.loads(run(capsys, "describe", "--sr-teacher", str(folder), "--json"))["sr_teacher"]

    assert (description["tap_timestep"], description["noise_seed"], description["up_kernel"]) == (350, 9, "bilinear")
    assert description["taps"] == {"down0": [8, 16, 16], "down1": [16, 8, 8], "mid": [16, 8, 8]}
    assert len(description["weights_sha256"]) == 64


def test_describe_needs_a_teacher(capsys):
    with pytest.raises(SystemExit) as caught:
        lvlrfr_main(["teachers", "describe"])

    assert caught.value.code == 2
    assert "--recognizer, --sr-teacher" in capsys.readouterr().err


def test_describe_missing_file(capsys, tmp_path: Path):
    with pytest.raises(SystemExit):
        lvlrfr_main(["teachers", "describe", "--recognizer", str(tmp_path / "absent.onnx")])

    assert "absent.onnx" in capsys.readouterr().err
