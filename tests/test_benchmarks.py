"""The benchmark scripts run and report what they claim to (figures are checked for sense, not speed)."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_throughput_reports_both_frameworks_side_by_side(tmp_path):
    out = tmp_path / "v1.json"
    command = [
        sys.executable,
        "benchmarks/throughput.py",
        "--arch=v1",
        "--width=0.25",
        "--batch=2",
        "--resolution=32",
        "--reps=2",
        "--seconds=0",
        f"--json={out}",
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    rows = report["results"]
    assert {row["framework"] for row in rows.values()} == {"jax", "torch"}
    for row in rows.values():
        assert row["train_images_per_s"] > 0 and row["infer_images_per_s"] > 0 and row["latency_ms"] > 0
        assert len(row["train_samples_s"]) == 2 and row["first_call_s"]["train"] > 0
    (jax_name,) = [name for name, row in rows.items() if row["framework"] == "jax"]
    torch_row = next(row for row in rows.values() if row["framework"] == "torch")
    ratio = report["ratios"][jax_name]
    assert ratio["train"] == rows[jax_name]["train_images_per_s"] / torch_row["train_images_per_s"]
    assert ratio["latency"] == torch_row["latency_ms"] / rows[jax_name]["latency_ms"]
    assert report["machine"]["cpu_count"] == os.cpu_count()
    assert "ratio" in result.stdout and "train img/s" in result.stdout


@pytest.mark.slow
def test_throughput_rejects_unknown_modes():
    result = subprocess.run(
        [sys.executable, "benchmarks/throughput.py", "--modes=train,fly"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 2 and "unknown mode or framework ['fly']" in result.stderr
