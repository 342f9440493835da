"""Interchangeability with LeRobot 0.6.1 itself: a checkpoint saved by the policy core runs in LeRobot
(the reference venv ~/.cache/effvla-lerobot-ref, see ../shared/lerobot_reference) with identical actions.
Skipped where that venv is absent."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from effvla_ros.core.smolvla import build_random_policy, save_policy, tiny_arch

GOLDEN = Path(__file__).parent / "data" / "golden_tiny"
REF_PY = Path.home() / ".cache" / "effvla-lerobot-ref" / "bin" / "python"
REF_KIT = Path(__file__).resolve().parents[2] / "shared" / "lerobot_reference"
LEROBOT_LOAD = """
import sys, json
sys.path.insert(0, sys.argv[3])
import crop_shim  # noqa: F401  (transformers >= 5.15 cache crop)
from safetensors.torch import load_file
from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy
from lerobot.processor import PolicyProcessorPipeline
from lerobot.processor.converters import policy_action_to_transition, transition_to_policy_action
d, io_path = sys.argv[1], sys.argv[2]
pol = SmolVLAPolicy.from_pretrained(d).eval()
pre = PolicyProcessorPipeline.from_pretrained(d, config_filename="policy_preprocessor.json")
post = PolicyProcessorPipeline.from_pretrained(d, config_filename="policy_postprocessor.json",
    to_transition=policy_action_to_transition, to_output=transition_to_policy_action)
io = load_file(io_path)
raw = {k: io[k] for k in ["observation.images.camera1", "observation.images.camera2", "observation.state"]}
raw["task"] = ["open the drawer", "grasp the cup"]
a = post(pol.predict_action_chunk(pre(raw), noise=io["noise"].clone()))
print(json.dumps({"maxdiff": (a - io["actions"]).abs().max().item()}))
"""

@pytest.mark.slow
@pytest.mark.skipif(not REF_PY.exists() or not REF_KIT.exists(), reason="LeRobot reference venv/kit not present")
def test_lerobot_loads_our_checkpoint(tmp_path):
    """A checkpoint saved by save_policy runs in LeRobot 0.6.1 itself with identical actions."""
    import subprocess

    from effvla_ros.core.smolvla.checkpoint import load_vlm_files

    vlm = (GOLDEN / "vlm").resolve()
    cfg, tok = load_vlm_files(vlm)
    stats = {"observation.state": {"mean": torch.linspace(-1, 1, 6), "std": torch.linspace(0.5, 2, 6)},
             "action": {"mean": torch.linspace(1, -1, 6), "std": torch.linspace(2, 0.5, 6)}}
    policy = build_random_policy(tiny_arch(vlm_model_name=str(vlm)), tokenizer=tok, vlm_config=cfg, seed=5,
                                 stats=stats)
    d = save_policy(policy, tmp_path / "ours", include_vlm_files=False)
    g = torch.Generator().manual_seed(7)
    obs = {"observation.images.camera1": torch.rand(2, 3, 48, 64, generator=g),
           "observation.images.camera2": torch.rand(2, 3, 48, 64, generator=g),
           "observation.state": torch.randn(2, 6, generator=g)}
    noise = torch.randn(2, 10, 32, generator=g)
    actions = policy.predict_action_chunk({**obs, "task": ["open the drawer", "grasp the cup"]}, noise=noise).actions
    save_file({**obs, "noise": noise, "actions": actions}, str(tmp_path / "io.safetensors"))
    p = subprocess.run([str(REF_PY), "-c", LEROBOT_LOAD, str(d), str(tmp_path / "io.safetensors"),
                        str(REF_KIT / "scripts")], capture_output=True, text=True, timeout=300,
                       env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "2"})
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(p.stdout.strip().splitlines()[-1])["maxdiff"] <= 1e-5
