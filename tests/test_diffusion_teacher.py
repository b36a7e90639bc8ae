"""Tests of the diffusion SR teacher, its stage 0a LightningModule and the sample grid helpers.

They use a real diffusers UNet at small width and real aligned LFW faces.
"""

from __future__ import annotations

import time
from pathlib import Path

import huggingface_hub.constants
import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lvlrfr.data.image import load_rgb, to_tensor
from lvlrfr.stages.sr_teacher import SuperResolutionTeacher
from lvlrfr.teachers.diffusion import DiffusionSRTeacher
from lvlrfr.utils.images import make_grid_image, save_png_atomic

SMALL_TEACHER = {
    "sample_size": 16,
    "block_out_channels": [8, 16],
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "attention_head_dim": 8,
    "tap_timestep": 200,
    "noise_seed": 7,
}
VLR_SIZE = 8
INPUT_SIZE = 32


def make_vlr(hr: torch.Tensor) -> torch.Tensor:
    """Degrade (B, 3, 112, 112) faces to 8 pixels and up-sample them to the model input size."""
    low = F.interpolate(hr, size=(VLR_SIZE, VLR_SIZE), mode="area")
    return F.interpolate(low, size=(INPUT_SIZE, INPUT_SIZE), mode="bicubic", align_corners=False).clamp(-1, 1)


@pytest.fixture(scope="module")
def faces(lfw_root: Path) -> torch.Tensor:
    """Six HR faces (6, 3, 112, 112) in [-1, 1], one per person."""
    people = sorted(path for path in lfw_root.iterdir() if path.is_dir())[:6]
    images = [to_tensor(load_rgb(sorted(person.glob("*.jpg"))[0])) for person in people]
    return torch.stack(images)


@pytest.fixture()
def teacher() -> DiffusionSRTeacher:
    torch.manual_seed(0)
    return DiffusionSRTeacher(**SMALL_TEACHER).eval()


def assert_taps_close(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> None:
    assert first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(first[name], second[name], rtol=1e-5, atol=1e-5, msg=f"tap {name} differs")


def test_taps_names_and_shapes(teacher, faces):
    taps = teacher.encode(make_vlr(faces[:3]))

    assert teacher.tap_names == ["down0", "down1", "mid"]
    assert list(taps) == teacher.tap_names
    assert teacher.tap_shapes() == {"down0": (8, 16, 16), "down1": (16, 8, 8), "mid": (16, 8, 8)}
    for name, tap in taps.items():
        assert tuple(tap.shape) == (3, *teacher.tap_shapes()[name])


@pytest.mark.parametrize(
    "down_block_types",
    [["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"], ["ResnetDownsampleBlock2D", "DownBlock2D", "AttnDownBlock2D"]],
)
def test_tap_shapes_match_encode(down_block_types, faces):
    config = {**SMALL_TEACHER, "sample_size": 32, "block_out_channels": [8, 16, 16]}
    teacher = DiffusionSRTeacher(**config, down_block_types=down_block_types).eval()
    with torch.no_grad():
        taps = teacher.encode(make_vlr(faces[:2]))

    assert teacher.tap_shapes() == {
        "down0": (8, 32, 32),
        "down1": (16, 16, 16),
        "down2": (16, 8, 8),
        "mid": (16, 8, 8),
    }
    for name, tap in taps.items():
        assert tuple(tap.shape) == (2, *teacher.tap_shapes()[name])


def test_taps_match_unet_forward(teacher, faces):
    """The encoder-only pass gives the same features as diffusers' full UNet2DModel.forward."""
    vlr = make_vlr(faces[:2])
    captured = {}

    def capture(name):
        def hook(module, args, output):
            # Down blocks return (output, per-layer states); the tap is the last resnet layer's state.
            captured[name] = output[1][len(module.resnets) - 1] if name != "mid" else output

        return hook

    hooks = [block.register_forward_hook(capture(f"down{i}")) for i, block in enumerate(teacher.unet.down_blocks)]
    hooks.append(teacher.unet.mid_block.register_forward_hook(capture("mid")))

    sample = torch.cat([teacher.tap_noise(2, vlr.device), teacher.resize_condition(vlr)], dim=1)
    with torch.no_grad():
        teacher.unet(sample, teacher.tap_timestep)
    # encode() calls the same blocks, so the hooks are removed before it runs.
    for hook in hooks:
        hook.remove()
    with torch.no_grad():
        taps = teacher.encode(vlr)

    assert_taps_close(taps, captured)


def test_taps_deterministic_across_batches(teacher, faces):
    vlr = make_vlr(faces[:4])
    with torch.no_grad():
        first = teacher.encode(vlr)
        again = teacher.encode(vlr)
        reordered = teacher.encode(torch.stack([vlr[3], vlr[0], faces.new_zeros(3, INPUT_SIZE, INPUT_SIZE)]))
        alone = teacher.encode(vlr[3:4])

    assert_taps_close(first, again)
    assert_taps_close({name: tap[3:4] for name, tap in first.items()}, {name: tap[:1] for name, tap in reordered.items()})
    assert_taps_close({name: tap[0:1] for name, tap in first.items()}, {name: tap[1:2] for name, tap in reordered.items()})
    assert_taps_close({name: tap[3:4] for name, tap in first.items()}, alone)


def test_tap_noise_keys(teacher):
    keys = torch.tensor([5, 9, 5])
    noise = teacher.tap_noise(3, torch.device("cpu"), keys)
    single = teacher.tap_noise(1, torch.device("cpu"), torch.tensor([9]))

    assert torch.equal(noise[0], noise[2])
    assert torch.equal(noise[1], single[0])
    assert not torch.allclose(noise[0], noise[1])
    assert not torch.allclose(noise[1], teacher.tap_noise(1, torch.device("cpu"))[0])


def test_taps_change_with_vlr(teacher, faces):
    with torch.no_grad():
        first = teacher.encode(make_vlr(faces[:2]))
        other = teacher.encode(make_vlr(faces[2:4]))

    for name in teacher.tap_names:
        assert (first[name] - other[name]).abs().max() > 1e-3, f"tap {name} ignores the VLR input"


def test_taps_condition_on_hr(faces):
    torch.manual_seed(0)
    teacher = DiffusionSRTeacher(**SMALL_TEACHER, condition_on_hr=True).eval()
    vlr = make_vlr(faces[:2])
    with torch.no_grad():
        first = teacher.encode(vlr, faces[:2])
        other_hr = teacher.encode(vlr, faces[2:4])

    assert (first["down0"] - other_hr["down0"]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="condition_on_hr=True"):
        teacher.encode(vlr)


def test_training_loss_decreases(faces):
    torch.manual_seed(0)
    teacher = DiffusionSRTeacher(**SMALL_TEACHER)
    hr, vlr = faces[:4], make_vlr(faces[:4])
    # The same 32 (image, timestep, noise) draws before and after training.
    hr_eval, vlr_eval = hr.repeat(8, 1, 1, 1), vlr.repeat(8, 1, 1, 1)

    def evaluation_loss() -> float:
        with torch.no_grad():
            return teacher.training_loss(hr_eval, vlr_eval, generator=torch.Generator().manual_seed(1)).item()

    before = evaluation_loss()
    optimizer = torch.optim.Adam(teacher.parameters(), lr=2e-3)
    for _ in range(30):
        optimizer.zero_grad()
        teacher.training_loss(hr, vlr).backward()
        optimizer.step()
    after = evaluation_loss()

    assert after < 0.8 * before, f"loss went from {before:.4f} to {after:.4f}"


def test_frozen_teacher_passes_no_gradients(teacher, faces):
    teacher.freeze()
    front = nn.Conv2d(3, 3, kernel_size=3, padding=1)
    parent = nn.ModuleDict({"front": front, "teacher": teacher})
    parent.train()

    taps = teacher.encode(front(make_vlr(faces[:2])))
    loss = sum(tap.pow(2).mean() for tap in taps.values())
    loss.backward()

    assert front.weight.grad is not None
    assert front.weight.grad.abs().sum() > 0
    assert all(parameter.grad is None for parameter in teacher.parameters())
    assert not any(parameter.requires_grad for parameter in teacher.parameters())
    assert front.training
    assert not any(module.training for module in teacher.modules())


def test_save_pretrained_round_trip(teacher, faces, tmp_path):
    teacher.save_pretrained(tmp_path / "sr-teacher")
    loaded = DiffusionSRTeacher.from_pretrained(tmp_path / "sr-teacher").eval()
    vlr = make_vlr(faces[:2])
    with torch.no_grad():
        expected = teacher.encode(vlr)
        actual = loaded.encode(vlr)

    assert loaded.describe() == teacher.describe()
    for name in teacher.tap_names:
        assert torch.equal(expected[name], actual[name]), f"tap {name} differs after the round trip"


def test_from_pretrained_offline_hub_id(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    start = time.monotonic()
    with pytest.raises(OSError) as error:
        DiffusionSRTeacher.from_pretrained("lvlrfr-test/absent-sr-teacher")

    assert time.monotonic() - start < 15
    message = str(error.value)
    assert "lvlrfr-test/absent-sr-teacher" in message
    assert "save_pretrained" in message
    assert "unet/ and scheduler/" in message


def test_from_pretrained_missing_folder(tmp_path):
    missing = tmp_path / "no" / "teacher"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        DiffusionSRTeacher.from_pretrained(missing)


def test_from_pretrained_empty_folder(tmp_path):
    with pytest.raises(OSError, match="save_pretrained") as error:
        DiffusionSRTeacher.from_pretrained(tmp_path)

    assert f"folder {tmp_path}" in str(error.value)


def test_super_resolve_shape_and_range(teacher, faces):
    vlr = make_vlr(faces[:3])
    first = teacher.super_resolve(vlr, num_inference_steps=3, generator=torch.Generator().manual_seed(3))
    again = teacher.super_resolve(vlr, num_inference_steps=3, generator=torch.Generator().manual_seed(3))
    ddpm = teacher.super_resolve(vlr, num_inference_steps=3, generator=torch.Generator().manual_seed(3), sampler="ddpm")

    assert first.shape == (3, 3, 16, 16)
    assert ddpm.shape == (3, 3, 16, 16)
    assert first.min() >= -1
    assert first.max() <= 1
    assert first.std() > 0.01
    assert torch.equal(first, again)


def test_grid_image_layout():
    hr = torch.rand(2, 3, 32, 32) * 2 - 1
    vlr = torch.rand(2, 3, 8, 8) * 2 - 1
    grid = make_grid_image([hr, vlr], ["HR", "VLR"])
    array = np.asarray(grid)

    assert grid.height == 2 * 32 + 3 * 2
    # The last cell of the VLR row is the 8x8 image grown 4x by nearest neighbour.
    cell = array[grid.height - 2 - 32 : grid.height - 2, grid.width - 2 - 32 : grid.width - 2]
    expected = ((vlr[1].permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).numpy()
    assert np.array_equal(cell[::4, ::4], expected)
    assert np.array_equal(cell[3::4, 3::4], expected)


def test_grid_image_rejects_mismatched_rows():
    with pytest.raises(ValueError, match="same number of images"):
        make_grid_image([torch.zeros(2, 3, 8, 8), torch.zeros(3, 3, 8, 8)], ["a", "b"])


def test_save_png_atomic(tmp_path):
    image = Image.new("RGB", (5, 4), (10, 20, 30))
    path = save_png_atomic(image, tmp_path / "nested" / "grid.png")

    assert path == tmp_path / "nested" / "grid.png"
    assert sorted(p.name for p in path.parent.iterdir()) == ["grid.png"]
    with Image.open(path) as written:
        assert written.format == "PNG"
        assert written.getpixel((4, 3)) == (10, 20, 30)


class FaceBatches(Dataset):
    """Dict samples in the data module's layout, from a tensor of HR faces."""

    def __init__(self, faces: torch.Tensor, with_label: bool) -> None:
        self.faces = faces
        self.vlr = make_vlr(faces)
        self.with_label = with_label

    def __len__(self) -> int:
        return len(self.faces)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = {"hr": self.faces[index], "vlr": self.vlr[index], "index": torch.tensor(index)}
        if self.with_label:
            sample["label"] = torch.tensor(index % 3)
        return sample


def test_stage_fast_dev_run_writes_grid(faces, tmp_path):
    torch.manual_seed(0)
    module = SuperResolutionTeacher(teacher=SMALL_TEACHER, learning_rate=1e-3, sample_grid_size=3, sample_steps=2)
    initial = {name: value.clone() for name, value in module.teacher.state_dict().items()}
    train = DataLoader(FaceBatches(faces[:4], with_label=True), batch_size=4)
    validation = [
        DataLoader(FaceBatches(faces[2:6], with_label=False), batch_size=4),
        DataLoader(FaceBatches(faces[:2], with_label=False), batch_size=2),
    ]
    trainer = L.Trainer(
        fast_dev_run=True,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, train_dataloaders=train, val_dataloaders=validation)

    metrics = trainer.callback_metrics
    for name in ("train/loss", "val/loss", "val/loss_dl1", "val/psnr"):
        assert name in metrics, f"{name} not logged; got {sorted(metrics)}"
        assert torch.isfinite(metrics[name])
    assert 0 < metrics["val/psnr"] < 60
    changed = [name for name, value in module.teacher.state_dict().items() if not torch.equal(value, initial[name])]
    assert changed, "one training step changed no teacher weight"

    grid_path = tmp_path / "samples" / "epoch_000.png"
    assert grid_path.is_file()
    with Image.open(grid_path) as grid:
        # Three rows (HR, VLR, SR) of 112-pixel cells with 2-pixel padding.
        assert grid.height == 3 * 112 + 4 * 2

    checkpoint = tmp_path / "stage0a.ckpt"
    trainer.save_checkpoint(checkpoint)
    restored = DiffusionSRTeacher.from_checkpoint(checkpoint).eval()
    vlr = make_vlr(faces[:2])
    with torch.no_grad():
        assert_taps_close(module.teacher.eval().encode(vlr), restored.encode(vlr))
    assert restored.describe() == module.teacher.describe()
