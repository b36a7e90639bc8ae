"""Tests of RecognizerTeacher and load_recognizer on real ONNX recognizers, exported iResNets and checkpoints."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from lvlrfr.models import Student, build_student, iresnet
from lvlrfr.teachers import SPEC_PRESETS, RecognizerSpec, RecognizerTeacher, TeacherSpecError, load_recognizer
from lvlrfr.teachers.spec import resolve_spec
from lvlrfr.teachers.zoo import ZooModelNotFoundError

TINY_SIZE = 32
TINY_EMBEDDING = 24
TINY_SPEC = {"architecture": "iresnet18", "input_size": TINY_SIZE, "embedding_size": TINY_EMBEDDING}


def _randomise_batch_norms(net: nn.Module, generator: torch.Generator) -> None:
    """Give every BatchNorm non-trivial statistics and affine values, as a trained network has."""
    for module in net.modules():
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            size = module.num_features
            module.running_mean.copy_(torch.randn(size, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(size, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(size, generator=generator) * 0.1)


@pytest.fixture(scope="module")
def tiny_iresnet() -> nn.Module:
    generator = torch.Generator().manual_seed(0)
    net = iresnet("iresnet18", width=0.125, input_size=TINY_SIZE, num_features=TINY_EMBEDDING)
    _randomise_batch_norms(net, generator)
    return net.eval()


@pytest.fixture(scope="module")
def tiny_onnx(tiny_iresnet, tmp_path_factory) -> Path:
    """The tiny iResNet exported by torch's dynamo exporter at opset 17 with a dynamic batch."""
    path = tmp_path_factory.mktemp("onnx") / "tiny_iresnet.onnx"
    example = torch.zeros(2, 3, TINY_SIZE, TINY_SIZE)
    torch.onnx.export(
        tiny_iresnet,
        (example,),
        str(path),
        input_names=["input"],
        output_names=["embedding"],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        dynamo=True,
        opset_version=17,
    )
    return path


@pytest.fixture(scope="module")
def tiny_pth(tiny_iresnet, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pth") / "backbone.pth"
    torch.save(tiny_iresnet.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.rand(4, 3, TINY_SIZE, TINY_SIZE, generator=generator) * 2 - 1


def _load_face(root: Path, name: str, number: int) -> torch.Tensor:
    array = np.asarray(Image.open(root / name / f"{name}_{number:04d}.jpg").convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1


@pytest.fixture(scope="module")
def lfw_pairs(lfw_root) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left faces, right faces and same-person flags of the first 5 matched and 5 mismatched pairs."""
    lines = (lfw_root / "pairs.txt").read_text().splitlines()[1:]
    matched = [line.split() for line in lines[:5]]
    mismatched = [line.split() for line in lines[300:305]]
    left, right = [], []
    for name, i, j in matched:
        left.append(_load_face(lfw_root, name, int(i)))
        right.append(_load_face(lfw_root, name, int(j)))
    for name1, i, name2, j in mismatched:
        left.append(_load_face(lfw_root, name1, int(i)))
        right.append(_load_face(lfw_root, name2, int(j)))
    same = torch.tensor([True] * len(matched) + [False] * len(mismatched))
    return torch.stack(left), torch.stack(right), same


REAL_MODELS = {
    "mobilefacenet_arcface": ("mobilefacenet/mobilefacenet_arcface.onnx", 192),
    "faceplugin": ("faceplugin/fr_feature.onnx", 512),
}


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_onnx_export_matches_torch(tiny_iresnet, tiny_onnx, images, backend):
    teacher = load_recognizer(tiny_onnx, TINY_SPEC | {"architecture": "onnx"}, backend=backend)

    with torch.no_grad():
        expected = tiny_iresnet(images)  # mean 127.5, std 127.5 maps [-1, 1] images to themselves
        embeddings = teacher(images)

    assert embeddings.shape == (4, TINY_EMBEDDING)
    assert embeddings.dtype == torch.float32
    assert F.cosine_similarity(embeddings, expected).min() > 0.999


def test_state_dict_matches_torch(tiny_iresnet, tiny_pth, images):
    teacher = load_recognizer(tiny_pth, TINY_SPEC)

    with torch.no_grad():
        torch.testing.assert_close(teacher(images), tiny_iresnet(images), rtol=1e-4, atol=1e-5)


def test_state_dict_without_spec(tiny_pth):
    teacher = load_recognizer(tiny_pth)

    assert teacher.spec.architecture == "iresnet18"
    assert teacher.spec.input_size == TINY_SIZE
    assert teacher.spec.embedding_size == TINY_EMBEDDING
    assert (teacher.spec.mean, teacher.spec.std, teacher.spec.colour_order) == (127.5, 127.5, "RGB")


@pytest.mark.parametrize(
    "field, value, found",
    [
        ("architecture", "iresnet34", "iresnet18"),
        ("input_size", 112, TINY_SIZE),
        ("embedding_size", 512, TINY_EMBEDDING),
    ],
)
def test_state_dict_spec_mismatch(tiny_pth, field, value, found):
    with pytest.raises(TeacherSpecError) as caught:
        load_recognizer(tiny_pth, TINY_SPEC | {field: value})

    assert caught.value.mismatches[field] == (value, found)
    assert field in str(caught.value)


def test_state_dict_wrong_family(tiny_pth):
    with pytest.raises(TeacherSpecError) as caught:
        load_recognizer(tiny_pth, TINY_SPEC | {"architecture": "mobilefacenet"})

    assert caught.value.mismatches == {"architecture": ("mobilefacenet", "iresnet18")}


def test_state_dict_key_differences(tiny_pth):
    with pytest.raises(TeacherSpecError) as caught:
        load_recognizer(tiny_pth, TINY_SPEC | {"model_kwargs": {"width": 0.25}})

    message = str(caught.value)
    assert caught.value.mismatches == {}
    assert "shape differences" in message
    assert "conv1.weight: spec (16, 3, 3, 3), file (8, 3, 3, 3)" in message


@pytest.mark.parametrize(
    "field, value, found",
    [
        ("layout", "NCHW", "NHWC"),
        ("input_size", 96, 112),
        ("embedding_size", 512, 192),
    ],
)
def test_onnx_spec_mismatch(shared_models, field, value, found):
    path = shared_models / REAL_MODELS["mobilefacenet_arcface"][0]

    with pytest.raises(TeacherSpecError) as caught:
        load_recognizer(path, {"preset": "mobilefacenet_arcface", field: value})

    message = str(caught.value)
    assert caught.value.mismatches == {field: (value, found)}
    assert field in message
    assert "mobilefacenet_arcface.onnx is the file that preset 'mobilefacenet_arcface' describes" in message
    assert "cannot be read from a model file" not in message


def test_onnx_nchw_file_with_nhwc_spec(shared_models):
    """The graph's fields and those recorded for the known file are listed in one error."""
    with pytest.raises(TeacherSpecError) as caught:
        load_recognizer(shared_models / REAL_MODELS["faceplugin"][0], "mobilefacenet_arcface", backend="onnxruntime")

    message = str(caught.value)
    assert caught.value.mismatches == {
        "colour_order": ("RGB", "BGR"),
        "layout": ("NHWC", "NCHW"),
        "mean": (127.5, 127.0),
        "embedding_size": (192, 512),
    }
    assert caught.value.known_preset == "faceplugin"
    assert message.count("Fix:") == 1
    assert "Fix: set colour_order: BGR, layout: NCHW, mean: 127.0, embedding_size: 512 in the teacher spec" in message
    assert "recognizer_spec: faceplugin in a stage config" in message
    assert "spec: faceplugin in an evaluate config" in message
    assert "`spec: faceplugin`" not in message
    assert "cannot be read from a model file" not in message


def test_onnx_fix_line_suffices(shared_models):
    """A spec with the values of the Fix line loads the file without a second error."""
    path = shared_models / REAL_MODELS["faceplugin"][0]
    with pytest.raises(TeacherSpecError) as caught:
        load_recognizer(path, "mobilefacenet_arcface", backend="onnxruntime")
    fixed = {"preset": "mobilefacenet_arcface"} | {name: found for name, (_, found) in caught.value.mismatches.items()}

    teacher = load_recognizer(path, fixed, backend="onnxruntime")

    assert teacher.spec == SPEC_PRESETS["faceplugin"]


def test_unknown_onnx_error_asks_for_documentation(tiny_onnx):
    with pytest.raises(TeacherSpecError) as caught:
        load_recognizer(tiny_onnx, TINY_SPEC | {"architecture": "onnx", "embedding_size": 512}, backend="onnxruntime")

    message = str(caught.value)
    assert caught.value.mismatches == {"embedding_size": (512, TINY_EMBEDDING)}
    assert caught.value.known_preset is None
    assert "colour_order, mean, std cannot be read from a model file" in message
    assert "sha256" not in message


def test_unknown_onnx_with_registered_name(tiny_onnx, tmp_path):
    """A file not known by content but named like a preset's file gets that preset and the name hint."""
    import onnx

    renamed = tmp_path / "w600k_mbf.onnx"
    onnx.save(onnx.load(str(tiny_onnx)), str(renamed))  # the export keeps its weights in a file beside it

    with pytest.raises(TeacherSpecError) as caught:
        load_recognizer(renamed, backend="onnxruntime")

    message = str(caught.value)
    assert caught.value.mismatches == {"input_size": (112, TINY_SIZE), "embedding_size": (512, TINY_EMBEDDING)}
    assert "The preset 'w600k_mbf' describes files named w600k_mbf.onnx." in message
    assert "recognizer_spec: w600k_mbf in a stage config or spec: w600k_mbf in an evaluate config" in message
    assert "cannot be read from a model file" in message


def test_onnx_unknown_file_needs_spec(tiny_onnx):
    with pytest.raises(TeacherSpecError, match="embedding_size=24"):
        load_recognizer(tiny_onnx)


@pytest.mark.parametrize("preset", sorted(REAL_MODELS))
def test_real_teacher_separates_lfw_pairs(shared_models, lfw_pairs, preset):
    relative_path, embedding_size = REAL_MODELS[preset]
    teacher = load_recognizer(shared_models / relative_path, preset)
    left, right, same = lfw_pairs

    with torch.no_grad():
        left_embeddings, right_embeddings = teacher(left), teacher(right)
    cosines = F.cosine_similarity(left_embeddings, right_embeddings)

    assert left_embeddings.shape == (len(left), embedding_size)
    assert cosines[same].mean() > cosines[~same].mean() + 0.3


@pytest.mark.parametrize("preset", sorted(REAL_MODELS))
def test_real_teacher_backends_agree(shared_models, lfw_pairs, preset):
    path = shared_models / REAL_MODELS[preset][0]
    faces = lfw_pairs[0][:4]

    with torch.no_grad():
        converted = load_recognizer(path, preset, backend="torch")(faces)
        runtime = load_recognizer(path, preset, backend="onnxruntime")(faces)

    assert F.cosine_similarity(converted, runtime).min() > 0.999


def test_real_teacher_under_autocast(shared_models, lfw_pairs):
    teacher = load_recognizer(shared_models / REAL_MODELS["faceplugin"][0], "faceplugin")
    faces = lfw_pairs[0][:2]

    with torch.no_grad():
        full_precision = teacher(faces)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed_precision = teacher(faces)

    assert mixed_precision.dtype == torch.float32
    assert F.cosine_similarity(full_precision, mixed_precision).min() > 0.99


def test_teacher_is_frozen(shared_models):
    teacher = load_recognizer(shared_models / REAL_MODELS["faceplugin"][0])
    parent = nn.ModuleDict({"teacher": teacher, "student": nn.Linear(2, 2)})

    parent.train()

    assert teacher.spec.embedding_size == 512  # chosen from the file name
    assert all(not p.requires_grad for p in teacher.parameters())
    assert not teacher.training
    assert not any(module.training for module in teacher.modules())
    assert parent["student"].training


class _RecordingNetwork(nn.Module):
    """Stores its input and returns a column-weighted sum of each channel, so flips and channel order show."""

    def __init__(self, channel_axis: int):
        super().__init__()
        self.channel_axis = channel_axis
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x)
        nchw = x.permute(0, 3, 1, 2) if self.channel_axis == 3 else x
        column_weights = torch.linspace(0, 1, nchw.shape[-1])
        return (nchw * column_weights).sum(dim=(2, 3))


def test_teacher_converts_layout_colour_normalisation(images):
    spec = RecognizerSpec("custom", 16, "BGR", "NHWC", 127.0, 128.0, 3)
    network = _RecordingNetwork(channel_axis=3)
    teacher = RecognizerTeacher(network, spec)

    teacher(images)

    fed = network.inputs[0]
    resized = F.interpolate(images, size=(16, 16), mode="bilinear", antialias=True, align_corners=False)
    expected = ((resized + 1) * 127.5 - 127.0) / 128.0
    assert fed.shape == (4, 16, 16, 3)
    torch.testing.assert_close(fed, expected.flip(1).permute(0, 2, 3, 1))


def test_teacher_flip_fusion(images):
    network = _RecordingNetwork(channel_axis=1)
    plain = RecognizerTeacher(network, RecognizerSpec("custom", TINY_SIZE, embedding_size=3))
    summed = RecognizerTeacher(network, RecognizerSpec("custom", TINY_SIZE, embedding_size=3, flip_fusion="sum"))
    joined = RecognizerTeacher(network, RecognizerSpec("custom", TINY_SIZE, embedding_size=3, flip_fusion="concat"))

    original, flipped = plain(images), plain(images.flip(-1))

    assert not torch.allclose(original, flipped)
    torch.testing.assert_close(summed(images), original + flipped)
    torch.testing.assert_close(joined(images), torch.cat([original, flipped], dim=1))
    assert joined.output_size == 6


def test_lightning_checkpoint_loads_student(tmp_path, images):
    arguments = {"arch": "iresnet", "input_size": TINY_SIZE, "embedding_size": 16, "widths": [8, 16], "depths": [1, 1]}
    backbone, head = build_student(arguments["arch"], TINY_SIZE, 16, widths=[8, 16], depths=[1, 1])
    student = Student(backbone, head)
    _randomise_batch_norms(student, torch.Generator().manual_seed(2))
    student.eval()
    state = {f"recognizer.{key}": value for key, value in student.state_dict().items()}
    state["margin_head.weight"] = torch.zeros(10, 16)
    path = tmp_path / "recognizer.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": {**arguments, "margin": "arcface"}}, path)

    teacher = load_recognizer(path)

    assert teacher.spec.architecture == "iresnet"
    with torch.no_grad():
        torch.testing.assert_close(teacher(images), student(images), rtol=1e-4, atol=1e-5)
    with pytest.raises(TeacherSpecError) as caught:
        load_recognizer(path, {"architecture": "iresnet", "input_size": TINY_SIZE, "embedding_size": 32})
    assert caught.value.mismatches == {"embedding_size": (32, 16)}
    with pytest.raises(ValueError, match="'student.'"):
        load_recognizer(path, prefix="student.")


def test_spec_preset_with_override():
    spec = resolve_spec({"preset": "mobilefacenet_arcface", "flip_fusion": "sum"}, "model.onnx")

    assert (spec.layout, spec.std, spec.embedding_size, spec.flip_fusion) == ("NHWC", 128.0, 192, "sum")
    with pytest.raises(ValueError, match="colour"):
        resolve_spec({"color_order": "BGR"}, "model.onnx")
    with pytest.raises(ValueError, match="layout"):
        RecognizerSpec(layout="HWC")


@pytest.fixture(scope="module")
def insightface_storage():
    """insightface's download module, imported before any timing because the import takes seconds."""
    from insightface.utils import storage

    return storage


def test_zoo_name_offline_fails_fast(tmp_path, monkeypatch, insightface_storage):
    def refuse_connection(url, path=None, overwrite=False, sha1_hash=None):
        raise ConnectionError(f"cannot reach {url}")

    monkeypatch.setattr(insightface_storage, "download_file", refuse_connection)
    start = time.monotonic()

    with pytest.raises(ZooModelNotFoundError) as caught:
        load_recognizer("buffalo_l/w600k_r50.onnx", insightface_root=tmp_path)

    assert time.monotonic() - start < 10
    assert str(tmp_path / "models" / "buffalo_l" / "w600k_r50.onnx") in str(caught.value)
    assert "ConnectionError" in str(caught.value)


def test_zoo_download_stall_times_out(tmp_path, monkeypatch, insightface_storage):
    release = threading.Event()

    def hang(url, path=None, overwrite=False, sha1_hash=None):
        release.wait(60)

    monkeypatch.setattr(insightface_storage, "download_file", hang)
    start = time.monotonic()
    try:
        with pytest.raises(ZooModelNotFoundError, match="TimeoutError") as caught:
            load_recognizer("w600k_r50", insightface_root=tmp_path, download_timeout_s=1.0)
    finally:
        release.set()

    assert time.monotonic() - start < 10
    assert str(tmp_path / "models" / "buffalo_l" / "w600k_r50.onnx") in str(caught.value)


def test_zoo_name_found_on_disk(tmp_path, shared_models):
    pack = tmp_path / "models" / "buffalo_l"
    pack.mkdir(parents=True)
    (pack / "w600k_r50.onnx").symlink_to(shared_models / REAL_MODELS["faceplugin"][0])

    teacher = load_recognizer("w600k_r50", insightface_root=tmp_path, download=False)

    assert teacher.source == str(pack / "w600k_r50.onnx")
    assert teacher.spec.embedding_size == 512
    assert teacher.spec.mean == 127.5


def test_missing_source_lists_forms(tmp_path):
    with pytest.raises(FileNotFoundError, match="buffalo_l"):
        load_recognizer(tmp_path / "absent.onnx")


ARCFACE_TORCH_CONFIG = f"""
recognizer_spec:
  architecture: iresnet18
  input_size: {TINY_SIZE}
  colour_order: RGB
  layout: NCHW
  mean: 127.5
  std: 127.5
  embedding_size: {TINY_EMBEDDING}
"""


@pytest.fixture(scope="module")
def arcface_torch_onnx(tiny_iresnet, tmp_path_factory) -> Path:
    """Export the tiny iResNet as arcface_torch's torch2onnx.py does.

    That script uses the TorchScript exporter at opset 11, names the input ``data`` and renames the batch
    dimension to the symbol ``None``.
    """
    import onnx

    path = tmp_path_factory.mktemp("arcface_torch") / "model.onnx"
    example = torch.rand(1, 3, TINY_SIZE, TINY_SIZE) * 2 - 1
    torch.onnx.export(
        tiny_iresnet, example, str(path), input_names=["data"], keep_initializers_as_inputs=False, opset_version=11,
        dynamo=False,
    )
    model = onnx.load(str(path))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "None"
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_arcface_torch_onnx_from_config(tiny_iresnet, arcface_torch_onnx, images, backend):
    import yaml

    spec = yaml.safe_load(ARCFACE_TORCH_CONFIG)["recognizer_spec"]
    teacher = load_recognizer(str(arcface_torch_onnx), spec, backend=backend)

    with torch.no_grad():
        expected = tiny_iresnet(images)
        embeddings = teacher(images)

    assert embeddings.shape == (4, TINY_EMBEDDING)
    assert F.cosine_similarity(embeddings, expected).min() > 0.999


def test_known_file_bgr_spec_rejected(shared_models):
    spec = SPEC_PRESETS["mobilefacenet_arcface"].to_dict() | {"colour_order": "BGR"}

    with pytest.raises(TeacherSpecError) as caught:
        load_recognizer(shared_models / REAL_MODELS["mobilefacenet_arcface"][0], spec)

    assert caught.value.mismatches == {"colour_order": ("BGR", "RGB")}
    assert "colour_order" in str(caught.value)
    assert "{preset: mobilefacenet_arcface, colour_order: ...}" in str(caught.value)


def test_known_file_other_preset_rejected(shared_models):
    with pytest.raises(TeacherSpecError) as caught:
        load_recognizer(shared_models / REAL_MODELS["faceplugin"][0], "w600k_mbf", backend="onnxruntime")

    message = str(caught.value)
    assert caught.value.mismatches == {"colour_order": ("RGB", "BGR"), "mean": (127.5, 127.0), "std": (127.5, 128.0)}
    assert "Fix: set colour_order: BGR, mean: 127.0, std: 128.0 in the teacher spec" in message
    assert "{preset: faceplugin, colour_order: ...}" in message
    assert "cannot be read from a model file" not in message


def test_known_file_explicit_override(shared_models, caplog):
    path = shared_models / REAL_MODELS["faceplugin"][0]

    with caplog.at_level("WARNING", logger="lvlrfr.teachers.spec"):
        teacher = load_recognizer(path, {"preset": "faceplugin", "colour_order": "RGB"}, backend="onnxruntime")

    assert teacher.spec.colour_order == "RGB"
    assert "colour_order='RGB' overrides 'BGR'" in caplog.text


def test_renamed_known_file_preset(tmp_path, shared_models):
    renamed = tmp_path / "teacher.onnx"
    renamed.symlink_to(shared_models / REAL_MODELS["mobilefacenet_arcface"][0])

    teacher = load_recognizer(renamed, backend="onnxruntime")

    assert teacher.spec == SPEC_PRESETS["mobilefacenet_arcface"]
