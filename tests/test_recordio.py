"""insightface RecordIO: reading without mxnet, writing, and the errors on damaged files."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from lvlrfr.data.image import ImageReadError, load_rgb
from lvlrfr.data.sources.errors import DataFormatError
from lvlrfr.data.sources.recordio import (
    MAGIC,
    RecordIOReader,
    RecordIOSource,
    RecordIOWriter,
    encode_rgb,
    pack_record,
)


@pytest.fixture(scope="module")
def faces(shared_data: Path) -> list[tuple[np.ndarray, int]]:
    """Nine aligned LFW faces of three people, grouped by person: labels 0, 0, 0, 1, 1, 1, 2, 2, 2."""
    root = shared_data / "lfw-112x112"
    people = ["Abel_Pacheco", "Akhmed_Zakayev", "Abdullah_Gul"]
    samples = []
    for label, name in enumerate(people):
        files = sorted((root / name).glob("*.jpg"))[:3]
        samples.extend((load_rgb(path), label) for path in files)
    return samples


def write_plain_recordio(folder: Path, payloads: list[bytes]) -> tuple[Path, Path]:
    """Write records with keys 0..N-1 and no header record, following the format description directly."""
    rec_path, idx_path = folder / "plain.rec", folder / "plain.idx"
    with open(rec_path, "wb") as rec, open(idx_path, "w") as idx:
        for key, payload in enumerate(payloads):
            idx.write(f"{key}\t{rec.tell()}\n")
            rec.write(struct.pack("<II", MAGIC, len(payload)) + payload + b"\0" * (-len(payload) % 4))
    return rec_path, idx_path


def test_round_trip_png_exact(tmp_path, faces):
    with RecordIOWriter(tmp_path / "train.rec", tmp_path / "train.idx", image_format="png") as writer:
        keys = [writer.add(image, label) for image, label in faces]
    source = RecordIOSource(tmp_path)

    assert keys == list(range(1, 10))
    assert len(source) == 9
    assert source.num_classes == 3
    assert source.labels.dtype == np.int64
    assert source.labels.tolist() == [label for _, label in faces]
    for index, (image, label) in enumerate(faces):
        loaded, loaded_label = source[index]
        assert loaded.dtype == np.uint8
        assert loaded.shape == (112, 112, 3)
        assert np.array_equal(loaded, image)
        assert loaded_label == label


def test_header_and_identity_records(tmp_path, faces):
    with RecordIOWriter(tmp_path / "train.rec", tmp_path / "train.idx") as writer:
        for image, label in faces:
            writer.add(image, label)
    reader = RecordIOReader(tmp_path / "train.rec", tmp_path / "train.idx")

    header = reader.read_header(0)
    assert header.flag == 2
    assert header.label.tolist() == [10.0, 13.0]  # images are keys 1..9, identities keys 10..12
    ranges = [reader.read_header(key).label.tolist() for key in (10, 11, 12)]
    assert ranges == [[1.0, 4.0], [4.0, 7.0], [7.0, 10.0]]
    assert sorted(reader.keys) == list(range(13))


def test_float_array_labels(tmp_path, faces):
    with RecordIOWriter(tmp_path / "train.rec", image_format="png") as writer:
        for image, label in faces:
            writer.add(image, [float(label), 0.25, 7.0])
    source = RecordIOSource(tmp_path / "train.rec")

    assert source.labels.tolist() == [label for _, label in faces]
    assert source.reader.read_header(1).label.tolist() == [0.0, 0.25, 7.0]
    assert np.array_equal(source[4][0], faces[4][0])


def test_headerless_file_uses_every_key(tmp_path, faces):
    payloads = [pack_record(label, encode_rgb(image, "png")) for image, label in faces[:4]]
    rec_path, idx_path = write_plain_recordio(tmp_path, payloads)
    source = RecordIOSource(rec_path, idx_path)

    assert source.keys.tolist() == [0, 1, 2, 3]
    assert source.labels.tolist() == [0, 0, 0, 1]
    assert np.array_equal(source[3][0], faces[3][0])


def test_magic_inside_payload_splits_record(tmp_path):
    magic = struct.pack("<I", MAGIC)
    image_bytes = b"abcd" + magic + magic + b"tail!"
    with RecordIOWriter(tmp_path / "train.rec", tmp_path / "train.idx") as writer:
        writer.add(image_bytes, 5)
    reader = RecordIOReader(tmp_path / "train.rec", tmp_path / "train.idx")

    raw = (tmp_path / "train.rec").read_bytes()
    first_flag = struct.unpack_from("<I", raw, 4)[0] >> 29
    assert first_flag == 1  # the writer split the record where the magic number occurs
    header, stored = reader.read_record(1)
    assert stored == image_bytes
    assert header.label == 5.0


def test_truncated_rec_raises(tmp_path, faces):
    payloads = [pack_record(label, encode_rgb(image, "png")) for image, label in faces[:3]]
    rec_path, idx_path = write_plain_recordio(tmp_path, payloads)
    last_offset = int(idx_path.read_text().splitlines()[-1].split("\t")[1])
    with open(rec_path, "r+b") as rec:
        rec.truncate(last_offset + 8 + 100)

    with pytest.raises(DataFormatError, match="record key 2") as error:
        RecordIOSource(rec_path, idx_path)
    assert "plain.rec" in str(error.value)
    assert "past the end of the file" in str(error.value)


def test_idx_offset_past_end_raises(tmp_path, faces):
    rec_path, idx_path = write_plain_recordio(tmp_path, [pack_record(0, encode_rgb(faces[0][0], "png"))])
    size = rec_path.stat().st_size
    with open(idx_path, "a") as idx:
        idx.write(f"1\t{size + 64}\n")

    with pytest.raises(DataFormatError, match="line 2") as error:
        RecordIOReader(rec_path, idx_path)
    assert "plain.idx" in str(error.value)
    assert str(size + 64) in str(error.value)


def test_bad_idx_line_raises(tmp_path, faces):
    payloads = [pack_record(0, encode_rgb(image, "png")) for image, _ in faces[:2]]
    rec_path, idx_path = write_plain_recordio(tmp_path, payloads)
    lines = idx_path.read_text().splitlines()
    idx_path.write_text(f"{lines[0]}\n1 eighty\n")

    with pytest.raises(DataFormatError, match="line 2") as error:
        RecordIOReader(rec_path, idx_path)
    assert "plain.idx" in str(error.value)
    assert "'1 eighty'" in str(error.value)


def test_bad_magic_raises(tmp_path, faces):
    payloads = [pack_record(0, encode_rgb(image, "png")) for image, _ in faces[:3]]
    rec_path, idx_path = write_plain_recordio(tmp_path, payloads)
    offset = int(idx_path.read_text().splitlines()[1].split("\t")[1])
    with open(rec_path, "r+b") as rec:
        rec.seek(offset)
        rec.write(b"\xde\xad\xbe\xef")

    with pytest.raises(DataFormatError, match="record key 1") as error:
        RecordIOSource(rec_path, idx_path)
    assert "plain.rec" in str(error.value)
    assert "0xefbeadde" in str(error.value)


def test_unreadable_image_names_key(tmp_path, faces):
    with RecordIOWriter(tmp_path / "train.rec", tmp_path / "train.idx") as writer:
        writer.add(faces[0][0], 0)
        writer.add(b"not an image", 0)
        writer.add(faces[3][0], 1)

    source = RecordIOSource(tmp_path)
    with pytest.raises(ImageReadError, match="record key 2"):
        source[1]

    skipping = RecordIOSource(tmp_path, skip_unreadable=True)
    assert len(skipping) == 2
    assert skipping.skipped == [2]
    assert skipping.labels.tolist() == [0, 1]
    assert skipping.describe()["skipped"] == 1


def test_writer_rejects_ungrouped_labels(tmp_path, faces):
    with pytest.raises(ValueError, match="grouped by class"):
        with RecordIOWriter(tmp_path / "train.rec", tmp_path / "train.idx") as writer:
            for image, label in (faces[0], faces[3], faces[1]):
                writer.add(image, label)
    assert list(tmp_path.iterdir()) == []  # neither the files nor their temporary copies remain


def test_dataloader_fork_workers(tmp_path, faces):
    with RecordIOWriter(tmp_path / "train.rec", tmp_path / "train.idx", image_format="png") as writer:
        for image, label in faces:
            writer.add(image, label)
    source = RecordIOSource(tmp_path)
    source[0]  # opens the file in this process before the workers fork

    loader = torch.utils.data.DataLoader(source, batch_size=3, num_workers=2, multiprocessing_context="fork")
    images = torch.cat([batch[0] for batch in loader])
    labels = torch.cat([batch[1] for batch in loader])

    assert torch.equal(images, torch.from_numpy(np.stack([image for image, _ in faces])))
    assert labels.tolist() == [label for _, label in faces]


def test_pickled_source_reopens_file(tmp_path, faces):
    with RecordIOWriter(tmp_path / "train.rec", tmp_path / "train.idx", image_format="png") as writer:
        writer.add(faces[0][0], 0)
    source = RecordIOSource(tmp_path)
    source[0]

    copy = pickle.loads(pickle.dumps(source))
    assert copy.reader._fd is None
    assert np.array_equal(copy[0][0], faces[0][0])


def test_manifest_tracks_index(tmp_path, faces):
    manifests = []
    for count in (2, 3):
        folder = tmp_path / str(count)
        folder.mkdir()
        with RecordIOWriter(folder / "train.rec", folder / "train.idx") as writer:
            for image, label in faces[:count]:
                writer.add(image, label)
        manifests.append(RecordIOSource(folder).manifest())

    assert manifests[0]["images"] == 2
    assert manifests[1]["images"] == 3
    assert manifests[0]["idx_sha256"] != manifests[1]["idx_sha256"]
    assert manifests[0]["rec_bytes"] == (tmp_path / "2" / "train.rec").stat().st_size
