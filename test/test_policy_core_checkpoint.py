"""Checkpoint loading/saving of the SmolVLA policy core: errors that say what is missing and where,
pickle refused, legacy in-model statistics, tiny random policy save -> reload round trip."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from effvla_ros.core.smolvla import (
    CheckpointError,
    RuntimeConfig,
    build_random_policy,
    build_tiny_tokenizer,
    load_policy,
    read_arch,
    save_policy,
    tiny_arch,
)

GOLDEN = Path(__file__).parent / "data" / "golden_tiny"
HUB_ID = "HuggingFaceTB/SmolVLM2-500M-Video-Instruct"


def _copy_ckpt(tmp_path: Path) -> Path:
    d = tmp_path / "ckpt"
    shutil.copytree(GOLDEN / "fp32", d)
    return d


def _set_vlm_name(d: Path, name: str) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg["vlm_model_name"] = name
    (d / "config.json").write_text(json.dumps(cfg))


def _golden_obs(n: int = 2) -> tuple[dict, torch.Tensor, torch.Tensor]:
    ref = load_file(str(GOLDEN / "fp32" / "reference.safetensors"))
    tasks = json.loads((GOLDEN / "fp32" / "reference_info.json").read_text())["tasks"]
    obs: dict = {f"observation.images.{c}": ref[f"observation.images.{c}"][:n] for c in ("camera1", "camera2")}
    obs["observation.state"] = ref["observation.state.raw"][:n]
    obs["task"] = tasks[:n]
    return obs, ref["noise"][:n], ref["actions_unnormalized"][:n]


def test_missing_vlm_dir_names_what_and_where(tmp_path, monkeypatch):
    monkeypatch.delenv("EFFVLA_VLM_DIR", raising=False)
    d = _copy_ckpt(tmp_path)
    _set_vlm_name(d, str(tmp_path / "gone" / "tiny_vlm"))
    with pytest.raises(CheckpointError) as e:
        load_policy(d)
    msg = str(e.value)
    assert "tiny_vlm" in msg and "does not exist" in msg and "--vlm-dir" in msg
    assert str(d / "vlm") in msg  # the checkpoint's vlm/ folder was looked at too


def test_hub_id_not_in_offline_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("EFFVLA_VLM_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_hf_cache"))
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "empty_hf_cache"))
    d = _copy_ckpt(tmp_path)
    _set_vlm_name(d, HUB_ID)
    with pytest.raises(CheckpointError) as e:
        load_policy(d)
    msg = str(e.value)
    assert HUB_ID in msg and "Hugging Face cache" in msg and "--vlm-dir" in msg


def test_hub_id_resolved_by_explicit_dir_env_and_vlm_subfolder(tmp_path, monkeypatch):
    d = _copy_ckpt(tmp_path)
    _set_vlm_name(d, HUB_ID)
    assert load_policy(d, vlm_dir=GOLDEN / "vlm").arch.num_vlm_layers == 4
    monkeypatch.setenv("EFFVLA_VLM_DIR", str(GOLDEN / "vlm"))
    assert load_policy(d).arch.vocab_size == 304
    monkeypatch.delenv("EFFVLA_VLM_DIR")
    shutil.copytree(GOLDEN / "vlm", d / "vlm")
    assert load_policy(d).arch.text_hidden_size == 64


def test_vlm_dir_without_tokenizer(tmp_path):
    d = _copy_ckpt(tmp_path)
    bad = tmp_path / "vlm_no_tok"
    bad.mkdir()
    shutil.copy(GOLDEN / "vlm" / "config.json", bad / "config.json")
    with pytest.raises(CheckpointError) as e:
        load_policy(d, vlm_dir=bad)
    assert "tokenizer" in str(e.value) and str(bad) in str(e.value)


def test_pickle_refused(tmp_path):
    d = _copy_ckpt(tmp_path)
    (d / "model.safetensors").unlink()
    torch.save({"w": torch.zeros(1)}, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle"):
        load_policy(d, vlm_dir=GOLDEN / "vlm")
    from effvla_ros.core.smolvla.checkpoint import read_safetensors

    with pytest.raises(CheckpointError, match="pickle"):
        read_safetensors(d / "pytorch_model.bin")


def test_missing_weights_and_config(tmp_path):
    d = _copy_ckpt(tmp_path)
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_policy(d, vlm_dir=GOLDEN / "vlm")
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        load_policy(d, vlm_dir=GOLDEN / "vlm")


def test_legacy_stats_inside_model_safetensors(tmp_path):
    d = _copy_ckpt(tmp_path)
    stats = load_file(str(d / "policy_preprocessor_step_5_normalizer_processor.safetensors"))
    for f in d.glob("policy_*"):
        f.unlink()
    sd = load_file(str(d / "model.safetensors"))
    for k, v in stats.items():
        feat, stat = k.rsplit(".", 1)
        buf = feat.replace(".", "_")
        if feat == "action":
            sd[f"normalize_targets.buffer_{buf}.{stat}"] = v
            sd[f"unnormalize_outputs.buffer_{buf}.{stat}"] = v.clone()
        else:
            sd[f"normalize_inputs.buffer_{buf}.{stat}"] = v
    save_file(sd, str(d / "model.safetensors"))
    policy = load_policy(d, vlm_dir=GOLDEN / "vlm")
    obs, noise, expected = _golden_obs()
    out = policy.predict_action_chunk(obs, noise=noise)
    assert (out.actions - expected).abs().max() <= 1e-5


def test_tiny_build_save_reload_round_trip(tmp_path):
    arch = tiny_arch()
    stats = {"observation.state": {"mean": torch.linspace(-1, 1, 6), "std": torch.linspace(0.5, 2, 6)},
             "action": {"mean": torch.linspace(1, -1, 6), "std": torch.linspace(2, 0.5, 6)}}
    policy = build_random_policy(arch, tokenizer=build_tiny_tokenizer(), seed=3, stats=stats)
    assert policy.tokenizer.vocab_size + len(policy.tokenizer.get_added_vocab()) >= 300
    d = save_policy(policy, tmp_path / "tiny")
    # LeRobot's parameter names: same key set and shapes as the LeRobot-made golden checkpoint
    with safe_open(str(d / "model.safetensors"), "pt") as ours, \
         safe_open(str(GOLDEN / "fp32" / "model.safetensors"), "pt") as lerobot:
        assert set(ours.keys()) == set(lerobot.keys())
        for k in lerobot.keys():  # noqa: SIM118
            assert ours.get_slice(k).get_shape() == lerobot.get_slice(k).get_shape(), k
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["type"] == "smolvla" and cfg["chunk_size"] == 10 and cfg["num_vlm_layers"] == 4
    assert (d / "vlm" / "config.json").is_file() and (d / "vlm" / "tokenizer.json").is_file()

    reloaded = load_policy(d, runtime=RuntimeConfig())  # vlm/ found automatically
    g = torch.Generator().manual_seed(0)
    obs = {"observation.images.camera1": torch.rand(1, 3, 48, 64, generator=g),
           "observation.images.camera2": torch.rand(1, 3, 48, 64, generator=g),
           "observation.state": torch.randn(1, 6, generator=g), "task": "open the drawer"}
    noise = torch.randn(1, 10, 32, generator=g)
    a = policy.predict_action_chunk(obs, noise=noise).actions
    b = reloaded.predict_action_chunk(obs, noise=noise).actions
    assert a.shape == (1, 10, 6)
    # same weights: bit-exact on the Intel AMX machine, 5e-7 apart on an AMD EPYC (kernels chosen by alignment)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # normalization statistics survive the round trip and matter
    assert torch.equal(reloaded.normalizer.stats["action"]["std"], stats["action"]["std"])
    assert (a - policy.predict_action_chunk(obs, noise=noise).actions_normalized).abs().max() > 0.1


def test_read_arch_gives_load_policys_architecture_without_the_weights(tmp_path):
    # a checkpoint whose weights change what the config says (4 -> 2 VLM layers): the shapes decide, as in load_policy
    policy = build_random_policy(tiny_arch(num_vlm_layers=2), tokenizer=build_tiny_tokenizer(), seed=1)
    d = save_policy(policy, tmp_path / "two_layers")
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_vlm_layers"] = 4
    (d / "config.json").write_text(json.dumps(cfg))
    arch = read_arch(d)
    assert arch == load_policy(d, runtime=RuntimeConfig()).arch and arch.num_vlm_layers == 2
    golden = _copy_ckpt(tmp_path)  # LeRobot's own files
    assert read_arch(golden, vlm_dir=GOLDEN / "vlm") == load_policy(golden, vlm_dir=GOLDEN / "vlm").arch
    with pytest.raises(CheckpointError, match="config.json"):
        read_arch(tmp_path)


def test_training_loss_backpropagates_to_expert():
    policy = build_random_policy(tiny_arch(), tokenizer=build_tiny_tokenizer(), seed=1)
    policy.freeze_like_lerobot()
    g = torch.Generator().manual_seed(0)
    obs = {"observation.images.camera1": torch.rand(2, 3, 48, 64, generator=g),
           "observation.images.camera2": torch.rand(2, 3, 48, 64, generator=g),
           "observation.state": torch.randn(2, 6, generator=g), "task": ["open the drawer", "grasp the cup"]}
    loss = policy.flow_matching_loss(obs, torch.randn(2, 10, 6, generator=g)).mean()
    loss.backward()
    grad = policy.weights.model.action_out_proj.weight.grad
    assert grad is not None and grad.abs().max() > 0
    assert policy.weights.expert.layers[0].mlp.up_proj.weight.grad.abs().max() > 0
    assert policy.weights.model.state_proj.weight.grad.abs().max() > 0
    assert policy.weights.text.layers[0].mlp.up_proj.weight.grad is None  # frozen VLM


def test_default_dtypes_follow_load_vlm_weights(tmp_path):
    d = _copy_ckpt(tmp_path)
    assert load_policy(d, vlm_dir=GOLDEN / "vlm").weights.text.layers[0].mlp.up_proj.weight.dtype == torch.float32
    cfg = json.loads((d / "config.json").read_text())
    cfg["load_vlm_weights"] = True  # a pretrained-VLM checkpoint: LeRobot runs the VLM in bf16
    (d / "config.json").write_text(json.dumps(cfg))
    policy = load_policy(d, vlm_dir=GOLDEN / "vlm")
    assert policy.runtime.vlm_dtype == policy.runtime.vision_dtype == "bfloat16"
    assert policy.weights.text.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert policy.weights.expert.layers[0].mlp.up_proj.weight.dtype == torch.float32

