"""The tools a GPU session runs with (benchmarks/run_gpu.sh): a checkpoint carried as its layout, and the
real-size benchmark's inputs file and variant rows, on a tiny checkpoint."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from model_fixtures import write_tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__


def test_checkpoint_travels_as_its_layout(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """manifest: everything but the weights, plus every tensor's name, shape, dtype, mean and std; materialize:
    weights of those shapes and dtypes at those statistics (constant tensors exactly), which our loader loads."""
    from effvla_ros.core.smolvla import load_policy

    src = write_tiny_checkpoint(tmp_path / "src")
    out = tmp_path / "carried"
    script = str(REPO / "scripts" / "checkpoint_manifest.py")
    subprocess.run([sys.executable, script, "manifest", str(src), str(out)], check=True, timeout=120)
    assert not (out / "model.safetensors").exists() and (out / "config.json").read_text() == (src / "config.json").read_text()
    subprocess.run([sys.executable, script, "materialize", str(out), "--seed", "1"], check=True, timeout=120)
    a, b = _tensors(src / "model.safetensors"), _tensors(out / "model.safetensors")
    assert a.keys() == b.keys()
    for k, t in a.items():
        u = b[k]
        assert u.shape == t.shape and u.dtype == t.dtype, k
        if t.numel() > 1 and float(t.float().std()) == 0.0:
            assert torch.equal(u, t), k  # LayerNorm ones, zero biases: the same constant
        elif t.numel() > 1000:
            assert abs(float(u.float().mean()) - float(t.float().mean())) < 0.05 + 0.1 * float(t.float().std()), k
            assert 0.8 < float(u.float().std()) / float(t.float().std()) < 1.2, k
    assert not torch.equal(a[next(k for k in a if a[k].numel() > 1000)], b[next(k for k in a if a[k].numel() > 1000)])
    load_policy(out)  # loads as the original does


@pytest.mark.slow
def test_realsize_bench_inputs_file_and_variant_rows(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """--save-inputs writes the sequence a machine without the simulator reads with --inputs; --on-set changes
    the "on" row's setting and --on-alt adds a row "on*" in the same run, both recorded in the JSON report."""
    bench = str(REPO / "benchmarks" / "bench_e2e_realsize.py")
    inputs, report = tmp_path / "inputs.safetensors", tmp_path / "report.json"
    common = ["--tiny", "--skip-lerobot", "--frames", "2", "--warmup", "0", "--calib-frames", "2"]
    subprocess.run([sys.executable, bench, *common, "--save-inputs", str(inputs)], check=True, timeout=300,
                   capture_output=True)
    with safe_open(str(inputs), framework="pt") as f:
        meta = json.loads(f.metadata()["inputs"])
    assert set(meta["episodes"]) == {"3", "11"} and meta["episodes"]["3"]["frames"] == 3
    p = subprocess.run([sys.executable, bench, *common, "--inputs", str(inputs), "--backends", "cudagraph",
                        "--dtypes", "fp32", "--expert-reuse-fraction", "0", "--on-set", "inference.num_steps=3",
                        "--on-alt", "reuse.partial_shapes=0", "--json", str(report)],
                       check=True, timeout=600, capture_output=True, text=True)
    doc = json.loads(report.read_text())
    assert set(doc["rows"]) == {"ours cudagraph off fp32", "ours cudagraph on fp32", "ours cudagraph on* fp32"}
    assert doc["compression_on"]["inference"]["num_steps"] == 3
    assert doc["compression_on_alt"] == ["reuse.partial_shapes=0"]
    assert "| ours cudagraph on* fp32 |" in p.stdout
