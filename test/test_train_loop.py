"""effvla_ros.train.trainer / `effvla train`: a few steps reduce the loss; the checkpoint round-trips."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from effvla_ros.core.smolvla import load_policy
from effvla_ros.train.data import ChunkDataset, Episode, load_demos, write_demos
from effvla_ros.train.trainer import TrainConfig, build_policy, lr_at, masked_loss, train

from model_fixtures import random_episode

SIZE = 32  # 4x4 patches -> 2x2 tokens per camera: a seconds-scale model


def _episode(t: int, seed: int) -> Episode:
    return random_episode(t, seed, ["pick up the red cube and place it on the plate",
                                    "put the blue cube on the mat"][seed % 2], SIZE)


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    root = tmp_path_factory.mktemp("demos")
    write_demos(root, [_episode(14, s) for s in range(3)])
    return root


def _fixed_loss(policy, ds: ChunkDataset) -> float:
    g = torch.Generator().manual_seed(0)
    b = ds.batch(np.arange(len(ds)))
    n = len(ds)
    noise = torch.randn((n, policy.arch.chunk_size, policy.arch.max_action_dim), generator=g)
    t = torch.rand(n, generator=g) * 0.9 + 0.05
    with torch.no_grad():
        return float(masked_loss(policy, b, noise=noise, t=t))


def test_lr_schedule_warmup_then_cosine_to_floor():
    cfg = TrainConfig(data="", out="", steps=100, warmup=10, lr=1e-3, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(99, cfg) == pytest.approx(1e-4, rel=0.01)
    assert lr_at(50, cfg) < lr_at(20, cfg)
    assert lr_at(20, cfg, time_fraction=1.0) == pytest.approx(1e-4)  # the time budget anneals too


def test_train_config_names_a_bad_attention():
    with pytest.raises(ValueError, match="attention"):
        TrainConfig(data="", out="", attention="flash")


def test_training_reduces_loss_and_checkpoint_round_trips(demos, tmp_path):
    episodes, _ = load_demos(demos)
    ds = ChunkDataset(episodes, 10)
    before = _fixed_loss(build_policy(ds, SIZE, seed=0), ds)
    cfg = TrainConfig(data=str(demos), out=str(tmp_path / "ckpt"), steps=25, batch=8, lr=2e-3, warmup=5,
                      image_size=SIZE, seed=0, ema=0.0, save_every=20, threads=1, attention="fused")
    threads = torch.get_num_threads()
    try:
        res = train(cfg, progress=False, log=lambda s: None)
    finally:
        torch.set_num_threads(threads)
    assert res.policy.fused_attention is False  # trained through torch SDPA, returned for eager inference
    after = _fixed_loss(res.policy, ds)
    assert after < 0.8 * before, (before, after)
    log = json.loads((tmp_path / "ckpt" / "train_log.json").read_text())
    assert log["steps"] == 25 and log["final"] and log["history"][-1]["step"] == 25
    # every instruction word is a single token of the trained tokenizer
    ids = res.policy.tokenizer("pick up the yellow cube and place it onto the square mat")["input_ids"]
    assert len(ids) == 12

    loaded = load_policy(tmp_path / "ckpt")
    assert loaded.arch.cameras == ("scene", "wrist") and loaded.arch.chunk_size == 10
    obs = {"observation.images.scene": ds[3]["observation.images.scene"][None],
           "observation.images.wrist": ds[3]["observation.images.wrist"][None],
           "observation.state": ds[3]["observation.state"][None], "task": ds[3]["task"]}
    noise = torch.randn((1, 10, loaded.arch.max_action_dim), generator=torch.Generator().manual_seed(1))
    a = res.policy.predict_action_chunk(obs, noise=noise).actions
    b = loaded.predict_action_chunk(obs, noise=noise).actions
    # the same weights: equal up to the CPU's kernel choice (bit-exact on the Intel AMX machine; an AMD EPYC
    # picks kernels by tensor alignment and differed by 3e-8 here); a wrong or missing weight moves them by far more
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loaded.normalizer.stats["action"]["mean"], res.policy.normalizer.stats["action"]["mean"])


def test_train_command_writes_a_checkpoint(demos, tmp_path):
    from effvla_ros.commands import train as cmd

    p = argparse.ArgumentParser()
    cmd.add_arguments(p)
    out = tmp_path / "cli"
    args = p.parse_args(["--data", str(demos), "--out", str(out), "--steps", "3", "--batch", "4",
                         "--image-size", str(SIZE), "--no-progress", "--save-dtype", "float16", "--threads", "1",
                         "--chunk-size", "6", "--n-action-steps", "3", "--attention", "fused"])
    assert cmd.run(args) == 0
    assert (out / "model.safetensors").is_file() and (out / "vlm" / "tokenizer.json").is_file()
    assert json.loads((out / "train_log.json").read_text())["config"]["attention"] == "fused"
    arch = load_policy(out).arch
    assert arch.image_size == SIZE and (arch.chunk_size, arch.n_action_steps) == (6, 3)
    bad = p.parse_args(["--data", str(demos), "--out", str(out), "--image-size", "64", "--steps", "1"])
    assert cmd.run(bad) == 2  # the demos are 32 px
