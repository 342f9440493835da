"""`effvla infer` end to end on the tiny golden checkpoint (subprocess, as a user runs it)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

GOLDEN = Path(__file__).parent / "data" / "golden_tiny"
REPO = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "effvla_ros.cli", "infer", *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=240)


def test_infer_cli_matches_lerobot(tmp_path):
    ref = load_file(str(GOLDEN / "fp32" / "reference.safetensors"))
    tasks = json.loads((GOLDEN / "fp32" / "reference_info.json").read_text())["tasks"]
    row = 1
    obs = {f"observation.images.{c}": ref[f"observation.images.{c}"][row:row + 1].contiguous()
           for c in ("camera1", "camera2")}
    obs["observation.state"] = ref["observation.state.raw"][row:row + 1].contiguous()
    save_file(obs, str(tmp_path / "obs.safetensors"), metadata={"task": tasks[row]})
    save_file({"noise": ref["noise"][row:row + 1].contiguous()}, str(tmp_path / "noise.safetensors"))
    out = tmp_path / "actions.safetensors"
    p = _run("--checkpoint", str(GOLDEN / "fp32"), "--observation", str(tmp_path / "obs.safetensors"),
             "--noise", str(tmp_path / "noise.safetensors"), "--vlm-dir", str(GOLDEN / "vlm"), "--out", str(out))
    assert p.returncode == 0, p.stderr
    action = load_file(str(out))["action"]
    assert action.shape == (1, 10, 6)
    assert (action - ref["actions_unnormalized"][row:row + 1]).abs().max().item() <= 1e-5
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert summary["shape"] == [1, 10, 6] and "prefill" in summary["stats"] and summary["attention"] == "eager"

    # fused attention (torch SDPA): the same chunk as LeRobot's eager path
    outf = tmp_path / "af.safetensors"
    p = _run("--checkpoint", str(GOLDEN / "fp32"), "--observation", str(tmp_path / "obs.safetensors"),
             "--noise", str(tmp_path / "noise.safetensors"), "--vlm-dir", str(GOLDEN / "vlm"),
             "--attention", "fused", "--out", str(outf))
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout.strip().splitlines()[-1])["attention"] == "fused"
    assert (load_file(str(outf))["action"] - ref["actions_unnormalized"][row:row + 1]).abs().max().item() <= 1e-5

    # bf16 run: close to fp32 but not identical
    out16 = tmp_path / "a16.safetensors"
    p = _run("--checkpoint", str(GOLDEN / "fp32"), "--observation", str(tmp_path / "obs.safetensors"),
             "--noise", str(tmp_path / "noise.safetensors"), "--vlm-dir", str(GOLDEN / "vlm"),
             "--dtype", "lerobot-bf16", "--out", str(out16))
    assert p.returncode == 0, p.stderr
    a16 = load_file(str(out16))["action"]
    diff = (a16 - action).abs().max().item()
    assert 0 < diff < 1.0


def test_infer_cli_errors(tmp_path):
    save_file({"observation.state": torch.zeros(1, 6)}, str(tmp_path / "obs.safetensors"))
    p = _run("--checkpoint", str(GOLDEN / "fp32"), "--observation", str(tmp_path / "obs.safetensors"),
             "--out", str(tmp_path / "o.safetensors"))  # config.json's VLM path does not exist here
    assert p.returncode == 2 and "--vlm-dir" in p.stderr
    p = _run("--checkpoint", str(GOLDEN / "fp32"), "--vlm-dir", str(GOLDEN / "vlm"),
             "--observation", str(tmp_path / "obs.safetensors"), "--out", str(tmp_path / "o.safetensors"))
    assert p.returncode == 2 and "task" in p.stderr
