"""Early-exit calibration from data: similarities between consecutive observations, thresholds
that reproduce the target exit fractions, and the YAML the policy node loads."""
from __future__ import annotations

from pathlib import Path

import torch

from effvla_ros.core.calibration import calibrate, exit_similarities
from effvla_ros.core.early_exit import EarlyExitConfig, load_calibration, save_calibration
from effvla_ros.core.smolvla import build_random_policy, tiny_arch
from effvla_ros.core.smolvla.tokenizer import build_tiny_tokenizer


def _seq(n: int, drift: float):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(0)
    base = {c: torch.rand(3, 48, 64, generator=g) for c in ("camera1", "camera2")}
    for t in range(n):
        imgs = {c: (im + drift * t * torch.rand(3, 48, 64, generator=g)).clamp(0, 1) for c, im in base.items()}
        yield imgs, torch.zeros(6), "pick up the red cube"


def test_similarities_track_change_and_calibration_roundtrip(tmp_path: Path) -> None:
    policy = build_random_policy(tiny_arch(), tokenizer=build_tiny_tokenizer(), seed=4)
    still = exit_similarities(policy, _seq(4, 0.0), [1, 2])
    moving = exit_similarities(policy, _seq(4, 0.3), [1, 2])
    assert still.shape == (3, 2)
    torch.testing.assert_close(still, torch.ones_like(still), atol=1e-5, rtol=0)
    assert float(moving.mean()) < float(still.mean())
    res = calibrate(policy, _seq(12, 0.05), [1, 2], ratio=0.5, exit_fraction=0.5)
    assert res["exit_layers"] == [1, 2] and len(res["thresholds"]) == 2 and res["samples"] == 11
    f = tmp_path / "exit.yaml"
    save_calibration(f, res["exit_layers"], res["thresholds"])
    data = load_calibration(f)
    assert data["exit_layers"] == [1, 2]
    layers, thr = EarlyExitConfig(enabled=True, calibration_file=str(f)).resolved(policy.arch.num_vlm_layers)
    assert layers == [1, 2] and thr == data["thresholds"]


def test_calibrate_exit_command_writes_vlm_and_expert_thresholds(tmp_path: Path) -> None:
    import numpy as np
    import yaml

    from effvla_ros.cli import main
    from effvla_ros.train.data import Episode, write_demos

    from model_fixtures import write_tiny_checkpoint

    ckpt = write_tiny_checkpoint(tmp_path / "ckpt", cameras=("scene", "wrist"))
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (24, 24, 3))
    eps = []
    for s in range(2):
        imgs = np.stack([np.clip(base + 4 * t, 0, 255) for t in range(6)]).astype(np.uint8)  # slow drift
        eps.append(Episode(images={"scene": imgs, "wrist": imgs[:, ::-1].copy()}, state=np.zeros((6, 6), np.float32),
                           action=np.zeros((6, 6), np.float32), task="pick up the red cube", seed=s))
    write_demos(tmp_path / "demos", eps)
    out = tmp_path / "cal.yaml"
    try:
        main(["calibrate-exit", "--checkpoint", str(ckpt), "--demos", str(tmp_path / "demos"), "--out", str(out),
              "--episodes", "2", "--exit-layers", "1,2", "--expert-reuse-fraction", "0.5", "--num-steps", "4"])
    except SystemExit as e:
        assert e.code in (0, None)
    data = yaml.safe_load(out.read_text())
    assert data["exit_layers"] == [1, 2] and len(data["thresholds"]) == 2
    assert data["expert_num_steps"] == 4 and len(data["expert_thresholds"]) > 0
    assert EarlyExitConfig(enabled=True, calibration_file=str(out)).resolved(4)[0] == [1, 2]
    # no expert section when asked not to
    main_args = ["calibrate-exit", "--checkpoint", str(ckpt), "--demos", str(tmp_path / "demos"),
                 "--out", str(tmp_path / "vlm.yaml"), "--episodes", "1", "--expert-reuse-fraction", "-1"]
    try:
        main(main_args)
    except SystemExit as e:
        assert e.code in (0, None)
    assert "expert_thresholds" not in yaml.safe_load((tmp_path / "vlm.yaml").read_text())


def test_bad_calibration_files_are_refused_with_the_reason(tmp_path: Path) -> None:
    """A missing, non-YAML, non-mapping or non-numeric file: a ValueError naming calibration_file and what is wrong
    (before: AttributeError "'str' object has no attribute 'get'" at every inference)."""
    import pytest

    from effvla_ros.core.early_exit import ExpertReuseConfig

    cases = {
        "missing.yaml": (None, "does not exist"),
        "words.txt": ("just some words\n", "holds a str, not the mapping"),
        "broken.yaml": ("exit_layers: [1, 2\nthresholds: :\n", "is not a YAML file"),
        "list.yaml": ("- 1\n- 2\n", "holds a list"),
        "text.yaml": ("exit_layers: [a, b]\nthresholds: [0.9, 0.9]\n", "exit_layers must hold integers"),
        "thr.yaml": ("exit_layers: [1]\nthresholds: [high]\nexpert_thresholds: [x]\n", "must hold numbers"),
        "binary.yaml": (b"\xff\xfe\x00garbage", "is not a YAML file"),
    }
    for name, (content, why) in cases.items():
        p = tmp_path / name
        if isinstance(content, bytes):
            p.write_bytes(content)
        elif content is not None:
            p.write_text(content)
        with pytest.raises(ValueError, match="calibration_file") as e:
            EarlyExitConfig(enabled=True, calibration_file=str(p)).resolved(4)
        assert why in str(e.value), (name, str(e.value))
    with pytest.raises(ValueError, match="expert_thresholds must hold numbers"):
        ExpertReuseConfig(enabled=True, calibration_file=str(tmp_path / "thr.yaml")).resolved(2)
    with pytest.raises(ValueError, match="not the mapping"):
        load_calibration(tmp_path / "words.txt", expert=True)
