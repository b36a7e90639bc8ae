"""Tests of the teacher cache: item construction, build, sharding, resume, keys and the stages that read it.

They use real aligned LFW faces (a few people, linked into a temporary identity tree), a small iResNet
recognizer, a small diffusers UNet as the SR teacher and the real LowResFaceDataModule.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lvlrfr.data.datamodule import LowResFaceDataModule, TrainingFaces
from lvlrfr.data.degradation import Degradation
from lvlrfr.data.image import to_uint8
from lvlrfr.models import iresnet
from lvlrfr.models.student import StudentBackbone
from lvlrfr.stages import DiscriminativeDistillation, GenerativeDistillation
from lvlrfr.teachers import RecognizerSpec, RecognizerTeacher
from lvlrfr.teachers.cache import (
    ArraySpec,
    OUTPUTS_KEY,
    CachedTrainingFaces,
    FlipPairFaces,
    TeacherCache,
    building_folder,
    check_cache_root,
    entry_folder,
    fill_shard,
    finish_build,
    input_arrays,
    open_or_build,
    prepare_build,
)
from lvlrfr.teachers.cache_entries import recognizer_key, sr_teacher_key
from lvlrfr.teachers.diffusion import DiffusionSRTeacher
from lvlrfr.utils.errors import ConfigurationError

PEOPLE = ["Abdullah_Gul", "Adrien_Brody", "Alejandro_Toledo", "Alvaro_Uribe"]
IMAGES_PER_PERSON = 3
DEGRADATION = Degradation(vlr_size=16, input_size=32, noise_std=(0.0, 0.03), seed=3)
EMBEDDING = 24
ARRAYS = {"embedding": ArraySpec((EMBEDDING,), "float32")}
SMALL_SR_TEACHER = {
    "sample_size": 32,
    "block_out_channels": [16, 32],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "tap_timestep": 500,
    "noise_seed": 5,
}
STUDENT = {"arch": "iresnet", "input_size": 32, "depths": [1, 1], "widths": [8, 16]}


@pytest.fixture(scope="module")
def train_root(lfw_root, tmp_path_factory) -> Path:
    """An identity tree of 4 LFW people x 3 images (12 images), linked to the shared files."""
    root = tmp_path_factory.mktemp("faces")
    for person in PEOPLE:
        (root / person).mkdir()
        for image in sorted((lfw_root / person).glob("*.jpg"))[:IMAGES_PER_PERSON]:
            (root / person / image.name).symlink_to(image)
    return root


def make_datamodule(train_root: Path, degradation: Degradation = DEGRADATION, **overrides) -> LowResFaceDataModule:
    settings = dict(
        train_root=str(train_root), pairs_file=None, degradation=degradation, batch_size=4,
        eval_batch_size=5, num_workers=0, flip=True,
    )
    return LowResFaceDataModule(**(settings | overrides))


def tiny_recognizer(seed: int = 0) -> RecognizerTeacher:
    """A random iResNet-18 at width 1/8 reading 32-pixel faces, wrapped as a frozen teacher."""
    torch.manual_seed(seed)
    network = iresnet("iresnet18", width=0.125, input_size=32, num_features=EMBEDDING).eval()
    return RecognizerTeacher(network, RecognizerSpec("iresnet18", 32, embedding_size=EMBEDDING))


def embedding_of(teacher: RecognizerTeacher):
    def compute(batch):
        return {"embedding": teacher(batch["hr"])}

    return compute


def vlr_signature(batch):
    """A teacher stand-in whose output depends on the VLR face, so the degradation key shows."""
    return {"embedding": batch["vlr"].flatten(1)[:, :EMBEDDING] + batch["flipped"].float()[:, None]}


@pytest.fixture(scope="module")
def faces(train_root) -> FlipPairFaces:
    return FlipPairFaces.from_datamodule(make_datamodule(train_root))


def build(root, faces, compute, key=None, **options) -> TeacherCache:
    return open_or_build(root, "recognizer", key or {"teacher": "tiny"}, ARRAYS, faces, compute, batch_size=5, **options)


def test_flip_pairs_match_training_faces(train_root, faces):
    datamodule = make_datamodule(train_root, max_train_images=7)
    training = datamodule.train_dataset()
    subset_faces = FlipPairFaces.from_datamodule(datamodule)
    torch.manual_seed(11)
    seen_flips = set()

    for position in range(len(training)):
        expected = training[position]
        row, flipped = position, int(expected["flipped"])
        seen_flips.add(flipped)
        item = subset_faces[subset_faces.pairs.index((row, flipped))]
        for name in ("hr", "vlr", "label", "index", "flipped"):
            assert torch.equal(item[name], expected[name]), f"{name} of image {position} flipped={flipped} differs"
        upsampled = datamodule.degradation.upsample(item["vlr_pixels"].numpy())
        assert torch.equal(torch.from_numpy(upsampled), torch.from_numpy(to_uint8(expected["vlr"])))
    assert isinstance(training.dataset, TrainingFaces)
    assert seen_flips == {0, 1}


def test_cached_faces_match_training_faces(tmp_path, train_root):
    """Same seed, same order: the cached set yields the same flips, VLR faces and labels, and the stored outputs."""
    datamodule = make_datamodule(train_root, max_train_images=9)
    faces = FlipPairFaces.from_datamodule(datamodule)
    cache = build(tmp_path, faces, vlr_signature)
    cached = cache.training_faces(datamodule.degradation, flip=True)
    assert isinstance(cached, CachedTrainingFaces)

    torch.manual_seed(5)
    expected = [datamodule.train_dataset()[position] for position in range(len(cached))]
    torch.manual_seed(5)
    served = [cached[position] for position in range(len(cached))]

    assert {bool(item["flipped"]) for item in expected} == {False, True}
    for position, (item, reference) in enumerate(zip(served, expected)):
        assert "hr" not in item
        for name in ("vlr", "label", "index", "flipped"):
            assert torch.equal(item[name], reference[name]), f"{name} of item {position} differs"
        batch = torch.utils.data.default_collate([reference])
        np.testing.assert_array_equal(item[OUTPUTS_KEY]["embedding"].numpy(), vlr_signature(batch)["embedding"][0].numpy())


def test_cached_faces_pickle_without_arrays(tmp_path, faces):
    cache = build(tmp_path, faces, vlr_signature)
    dataset = cache.training_faces(DEGRADATION, flip=False)
    first = dataset[0]
    copy = pickle.loads(pickle.dumps(dataset))

    assert dataset._arrays is not None
    assert copy._arrays is None
    assert torch.equal(copy[0]["vlr"], first["vlr"])
    assert not first["flipped"]


def test_datamodule_serves_the_cached_set(tmp_path, train_root, faces):
    datamodule = make_datamodule(train_root, num_workers=1)
    cache = build(tmp_path, faces, vlr_signature)
    datamodule.use_training_faces(cache.training_faces(datamodule.degradation, datamodule.flip))

    batch = next(iter(datamodule.train_dataloader()))
    assert set(batch) == {"vlr", "label", "index", "flipped", OUTPUTS_KEY}
    assert batch[OUTPUTS_KEY]["embedding"].shape == (datamodule.batch_size, EMBEDDING)
    torch.testing.assert_close(cache.read(batch)["embedding"], cache.read({k: batch[k] for k in ("index", "flipped")})["embedding"])
    with pytest.raises(ValueError, match="5 items but the data module uses 12"):
        datamodule.use_training_faces(torch.utils.data.TensorDataset(torch.zeros(5)))


def test_cache_reads_teacher_outputs(tmp_path, train_root, faces):
    teacher = tiny_recognizer()
    cache = build(tmp_path, faces, embedding_of(teacher))
    loader = torch.utils.data.DataLoader(make_datamodule(train_root).train_dataset(), batch_size=5, shuffle=True)
    torch.manual_seed(2)

    for batch in loader:
        with torch.no_grad():
            expected = teacher(batch["hr"])
        torch.testing.assert_close(cache.read(batch)["embedding"], expected, rtol=1e-5, atol=1e-6)
    assert len(cache) == len(PEOPLE) * IMAGES_PER_PERSON
    assert cache.arrays["embedding"].shape == (len(cache), 2, EMBEDDING)
    assert not np.allclose(cache.arrays["embedding"][:, 0], cache.arrays["embedding"][:, 1])


def test_cache_layout_on_disk(tmp_path, faces):
    cache = build(tmp_path, faces, vlr_signature, key={"teacher": "layout"})
    meta = json.loads((cache.folder / "meta.json").read_text())

    assert cache.folder == entry_folder(tmp_path, "recognizer", {"teacher": "layout"})
    assert meta["key"] == {"teacher": "layout"}
    assert meta["arrays"] == {"embedding": {"shape": [EMBEDDING], "dtype": "float32"}}
    assert meta["bytes"] >= len(faces) * EMBEDDING * 4
    assert not building_folder(cache.folder).exists()
    assert np.array_equal(cache.indices, np.arange(len(PEOPLE) * IMAGES_PER_PERSON))


def test_sharded_build_matches_single(tmp_path, faces):
    single = build(tmp_path / "single", faces, vlr_signature)
    folder = entry_folder(tmp_path / "sharded", "recognizer", {"teacher": "tiny"})
    prepare_build(folder, {"teacher": "tiny"}, ARRAYS, faces.indices, input_arrays(DEGRADATION))

    written = fill_shard(folder, faces, vlr_signature, rank=0, world_size=2, batch_size=4)
    filled = np.load(building_folder(folder) / "filled.npy")
    assert written == 2 * len(range(0, len(faces.indices), 2))
    assert filled[0::2].all()
    assert not filled[1::2].any()
    with pytest.raises(RuntimeError, match="unfilled"):
        finish_build(folder, 0.0, world_size=2)

    fill_shard(folder, faces, vlr_signature, rank=1, world_size=2, batch_size=4)
    finish_build(folder, 0.0, world_size=2)
    sharded = TeacherCache.open(folder, {"teacher": "tiny"})
    assert np.array_equal(sharded.arrays["embedding"], single.arrays["embedding"])


def test_killed_build_resumes(tmp_path, faces, caplog):
    calls = []

    def dies_after_two_batches(batch):
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        calls.append(len(batch["index"]))
        return vlr_signature(batch)

    with pytest.raises(KeyboardInterrupt):
        build(tmp_path, faces, dies_after_two_batches)
    assert "next run resumes" in caplog.text
    assert TeacherCache.open(entry_folder(tmp_path, "recognizer", {"teacher": "tiny"}), {"teacher": "tiny"}) is None

    resumed_calls = []

    def counting(batch):
        resumed_calls.append(len(batch["index"]))
        return vlr_signature(batch)

    resumed = build(tmp_path, faces, counting)
    fresh = build(tmp_path / "fresh", faces, vlr_signature)
    assert sum(calls) == 10
    assert sum(resumed_calls) == 2 * len(faces.indices) - 10
    assert np.array_equal(resumed.arrays["embedding"], fresh.arrays["embedding"])


def test_stale_key_rebuilds(tmp_path, train_root):
    teacher = tiny_recognizer()
    datamodule = make_datamodule(train_root)
    other = make_datamodule(train_root, degradation=Degradation(vlr_size=16, input_size=32, noise_std=(0.0, 0.03), seed=4))
    key, other_key = recognizer_key(teacher, datamodule), recognizer_key(teacher, other)
    first = build(tmp_path, FlipPairFaces.from_datamodule(datamodule), vlr_signature, key=key)
    second = build(tmp_path, FlipPairFaces.from_datamodule(other), vlr_signature, key=other_key)

    assert key["degradation_fingerprint"] != other_key["degradation_fingerprint"]
    assert first.folder != second.folder
    assert not np.array_equal(first.arrays["embedding"], second.arrays["embedding"])

    meta_path = first.folder / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["key"]["hr_size"] = 96
    meta_path.write_text(json.dumps(meta))
    calls = []
    rebuilt = build(tmp_path, FlipPairFaces.from_datamodule(datamodule), lambda batch: calls.append(1) or vlr_signature(batch), key=key)
    assert calls, "a cache whose recorded key differs was reused"
    assert json.loads((rebuilt.folder / "meta.json").read_text())["key"]["hr_size"] == 112


def test_keys_follow_teacher_weights(train_root):
    datamodule = make_datamodule(train_root)
    torch.manual_seed(0)
    sr_teacher = DiffusionSRTeacher(**SMALL_SR_TEACHER)
    key = sr_teacher_key(sr_teacher, datamodule)
    with torch.no_grad():
        sr_teacher.unet.conv_in.bias.add_(1e-3)

    assert sr_teacher_key(sr_teacher, datamodule)["weights_sha256"] != key["weights_sha256"]
    assert recognizer_key(tiny_recognizer(0), datamodule) != recognizer_key(tiny_recognizer(1), datamodule)
    assert key["teacher"]["tap_timestep"] == 500
    assert key["data_manifest_sha256"] == datamodule.manifest()["sha256"]


def test_float16_overflow_rejected(tmp_path, faces):
    def huge(batch):
        return {"embedding": torch.full((len(batch["index"]), EMBEDDING), 1e6)}

    with pytest.raises(ValueError, match="float32"):
        open_or_build(tmp_path, "sr_teacher", {"k": 1}, {"embedding": ArraySpec((EMBEDDING,), "float16")}, faces, huge)


def test_cache_root_must_be_a_writable_folder(tmp_path, faces, monkeypatch):
    a_file = tmp_path / "cache.txt"
    a_file.write_text("not a folder")

    with pytest.raises(ConfigurationError, match=r"teacher_cache .*cache.txt is a file"):
        check_cache_root(a_file)
    with pytest.raises(ConfigurationError, match=r"cache.txt/sub cannot be created"):
        build(a_file / "sub", faces, vlr_signature)

    writable = os.access
    monkeypatch.setattr("lvlrfr.teachers.cache.os.access", lambda path, mode: False)
    with pytest.raises(ConfigurationError, match="is not writable"):
        build(tmp_path / "read_only", faces, vlr_signature)
    monkeypatch.setattr("lvlrfr.teachers.cache.os.access", writable)
    # A complete entry is read without writing.
    complete = build(tmp_path / "complete", faces, vlr_signature)
    monkeypatch.setattr("lvlrfr.teachers.cache.os.access", lambda path, mode: False)
    assert np.array_equal(build(tmp_path / "complete", faces, vlr_signature).arrays["embedding"], complete.arrays["embedding"])


def test_stage_rejects_file_as_cache(tmp_path, sr_teacher_folder):
    a_file = tmp_path / "cache.txt"
    a_file.write_text("not a folder")

    with pytest.raises(ConfigurationError, match="is a file"):
        GenerativeDistillation(str(tmp_path / "missing_teacher"), **STUDENT, teacher_cache=str(a_file))


def test_read_unknown_index(tmp_path, faces):
    cache = build(tmp_path, faces, vlr_signature)

    with pytest.raises(KeyError, match=r"\[999\]"):
        cache.read({"index": torch.tensor([0, 999]), "flipped": torch.tensor([False, True])})


def _distributed_build(rank: int, world_size: int, rendezvous: str, root: str, train_root: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world_size)
    try:
        faces = FlipPairFaces.from_datamodule(make_datamodule(Path(train_root)))
        build(root, faces, vlr_signature, rank=rank, world_size=world_size, barrier=dist.barrier)
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_build(tmp_path, train_root, faces):
    # fork, unlike spawn, does not import torch and lvlrfr again in each process.
    mp.start_processes(
        _distributed_build,
        args=(2, str(tmp_path / "rendezvous"), str(tmp_path / "ddp"), str(train_root)),
        nprocs=2,
        join=True,
        start_method="fork",
    )
    distributed = TeacherCache.open(entry_folder(tmp_path / "ddp", "recognizer", {"teacher": "tiny"}), {"teacher": "tiny"})
    single = build(tmp_path / "single", faces, vlr_signature)

    assert distributed is not None
    assert distributed.meta["world_size"] == 2
    assert np.array_equal(distributed.arrays["embedding"], single.arrays["embedding"])


# ------------------------------------------------------------------------------------ stages


class LossRecorder(L.Callback):
    """Records each training loss and counts the calls of ``<teacher_name>.<method>`` during training."""

    def __init__(self, teacher_name: str, method: str) -> None:
        self.teacher_name = teacher_name
        self.method = method
        self.losses: list[float] = []
        self.teacher_calls = 0
        self.batch_keys: set[str] = set()

    def on_train_start(self, trainer, module) -> None:
        teacher = getattr(module, self.teacher_name)
        original = getattr(teacher, self.method)

        def counted(*args, **kwargs):
            self.teacher_calls += 1
            return original(*args, **kwargs)

        setattr(teacher, self.method, counted)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))
        self.batch_keys |= set(batch)


def fit(module_factory, datamodule, teacher: tuple[str, str], tmp_path: Path, max_steps: int = 3, ckpt_path=None):
    L.seed_everything(0)
    module = module_factory()
    recorder = LossRecorder(*teacher)
    trainer = L.Trainer(
        max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path, callbacks=[recorder],
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return trainer, module, recorder


@pytest.fixture(scope="module")
def sr_teacher_folder(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return DiffusionSRTeacher(**SMALL_SR_TEACHER).save_pretrained(tmp_path_factory.mktemp("sr") / "teacher")


def test_generative_stage_cache_same_losses(tmp_path, train_root, sr_teacher_folder):
    def factory(cache=None):
        return lambda: GenerativeDistillation(str(sr_teacher_folder), **STUDENT, teacher_cache=cache)

    _, _, plain = fit(factory(), make_datamodule(train_root), ("sr_teacher", "encode"), tmp_path)
    datamodule = make_datamodule(train_root)
    _, module, cached = fit(factory(str(tmp_path / "cache")), datamodule, ("sr_teacher", "encode"), tmp_path)

    assert plain.teacher_calls == 3
    assert cached.teacher_calls == 0
    assert "hr" in plain.batch_keys
    assert "hr" not in cached.batch_keys
    np.testing.assert_allclose(cached.losses, plain.losses, rtol=1e-2)
    # After the fit the data module reads images again, and the module reopens the cache on its next fit.
    assert "hr" in datamodule.train_dataset()[0]
    assert module._teacher_cache is None
    (folder,) = (tmp_path / "cache").glob("sr_teacher-*")
    taps = TeacherCache(folder).arrays
    assert set(taps) == {"down0", "down1", "mid"}
    assert taps["down0"].dtype == np.float16
    assert taps["down0"].shape == (len(PEOPLE) * IMAGES_PER_PERSON, 2, 16, 32, 32)


def test_discriminative_stage_cache_same_losses(tmp_path, train_root):
    backbone = StudentBackbone(**STUDENT)
    student_checkpoint = tmp_path / "stage1.ckpt"
    state = {f"backbone.{key}": value for key, value in backbone.state_dict().items()}
    torch.save({"hyper_parameters": {"backbone": STUDENT, "degradation": DEGRADATION.to_dict()}, "state_dict": state}, student_checkpoint)
    recognizer_path = tmp_path / "backbone.pth"
    torch.save(tiny_recognizer().network.state_dict(), recognizer_path)
    spec = {"architecture": "iresnet18", "input_size": 32, "embedding_size": EMBEDDING}

    def factory(cache=None):
        return lambda: DiscriminativeDistillation(
            str(student_checkpoint), str(recognizer_path), spec, embedding_size=16, max_relation_pairs=None,
            relation_hidden_dim=32, relation_dim=16, teacher_cache=cache,
        )

    _, _, plain = fit(factory(), make_datamodule(train_root), ("recognizer", "forward"), tmp_path)
    cache = str(tmp_path / "cache")
    trainer, _, cached = fit(factory(cache), make_datamodule(train_root), ("recognizer", "forward"), tmp_path)

    assert plain.teacher_calls == 3
    assert cached.teacher_calls == 0
    assert "hr" in plain.batch_keys
    assert "hr" not in cached.batch_keys
    np.testing.assert_allclose(cached.losses, plain.losses, rtol=1e-4)

    checkpoint = tmp_path / "resume.ckpt"
    trainer.save_checkpoint(checkpoint)
    meta = next(Path(cache).glob("recognizer-*/meta.json"))
    built_at = meta.stat().st_mtime_ns
    _, _, resumed = fit(factory(cache), make_datamodule(train_root), ("recognizer", "forward"), tmp_path, max_steps=5, ckpt_path=checkpoint)
    assert len(resumed.losses) == 2
    assert resumed.teacher_calls == 0
    assert meta.stat().st_mtime_ns == built_at
