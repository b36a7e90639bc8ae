"""The teacher-cache benchmark, run end to end at a small size: it trains both stages and writes its report."""

from __future__ import annotations

import re

import pytest

from lvlrfr import benchmarks

@pytest.mark.slow
def test_benchmark_writes_report(tmp_path, lfw_root, shared_models):
    output = tmp_path / "benchmarks.md"
    recognizer = shared_models / "mobilefacenet" / "mobilefacenet_arcface.onnx"

    status = benchmarks.main([
        "--output", str(output), "--train-root", str(lfw_root), "--recognizer", str(recognizer),
        "--images", "64", "--batch-size", "16", "--epochs", "2", "--num-workers", "0",
        "--work-dir", str(tmp_path / "work"), "--sr-teachers", "cpu", "--recognizers", "shared",
    ])

    assert status == 0
    report = output.read_text()
    rows = [line.split(" | ") for line in report.splitlines() if line.startswith("| generative | CPU-profile diffusion")]
    rows += [line.split(" | ") for line in report.splitlines() if line.startswith("| discriminative | `mobilefacenet")]
    assert len(rows) == 2
    for row in rows:
        steps, plain, cached, speedup = row[2], row[3], row[4], row[5]
        assert steps == "4"
        assert len(plain.split(", ")) == len(cached.split(", ")) == 2
        assert float(speedup.rstrip("x")) > 0
        assert "(match)" in row[8]
    # One cache entry per stage, built once and complete.
    assert len(list((tmp_path / "work").glob("cache_*/*/meta.json"))) == 2
    shares = re.search(
        r"\| generative \| CPU-profile UNet \| [\d.]+, [\d.]+ \| (\d+)%, (\d+)% \|.* ([\d.]+)x \| (\d+|never) \|$", report, re.M
    )
    assert shares is not None
    assert all(0 < int(share) < 100 for share in shares.groups()[:2])
    assert shares.group(3) == rows[0][5].rstrip("x")
    assert (tmp_path / "work" / benchmarks.WORK_DIR_MARKER).is_file()


def test_benchmark_keeps_foreign_work_dir(tmp_path, capsys):
    work = tmp_path / "results"
    work.mkdir()
    (work / "keep.txt").write_text("user data")

    status = benchmarks.main(["--work-dir", str(work), "--output", str(tmp_path / "report.md")])

    assert status == 2
    assert "is not empty and was not created by this benchmark" in capsys.readouterr().err
    assert (work / "keep.txt").read_text() == "user data"
    assert not (tmp_path / "report.md").exists()
