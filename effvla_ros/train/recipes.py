"""Named training recipes: the demonstrations a checkpoint was trained on and its training settings.

``effvla train --recipe so101 --out DIR`` reproduces the bundled ``effvla_ros/assets/so101_pickplace``
checkpoint in one command: the recipe's demonstration sets are generated (scripted expert, deterministic
per seed) into ``--demos-root`` unless a complete set is already there, then training runs with the
recipe's settings (any option given explicitly on the command line overrides the recipe's value).
``effvla train --recipe so101_pruned --out DIR`` fine-tunes the bundled ``so101_pickplace`` (its ``init``), in two
stages (``Recipe.stages``, the first written to ``DIR_stage1``), into ``effvla_ros/assets/so101_pickplace_pruned``
(the bundled default checkpoint);
after retraining ``so101``, pass its output as ``--init``.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from effvla_ros.sim import dataset as sim_dataset


@dataclass(frozen=True)
class DemoSet:
    seed: int  # seed of the first episode (gen-demos --seed)
    episodes: int
    image_size: int = 64
    perturb: bool = False  # DART perturbations with the default Perturbation (gen-demos --perturb)
    aim_offset: tuple[float, float] = (0.0, 0.0)  # where the expert grasps (gen-demos --aim-offset), metres
    regrasp: bool = False  # a failed first grasp, then the recovery, default Regrasp (gen-demos --regrasp)

    @property
    def name(self) -> str:
        from effvla_ros.sim.scene import SCENE_VERSION  # imports MuJoCo

        dart = "_dart" if self.perturb else ""
        aim = "_aim{:+.1f}{:+.1f}mm".format(*(1000 * v for v in self.aim_offset)) if any(self.aim_offset) else ""
        regrasp = "_regrasp" if self.regrasp else ""
        return f"so101v{SCENE_VERSION}_s{self.image_size}_seed{self.seed}_n{self.episodes}{dart}{aim}{regrasp}"


@dataclass(frozen=True)
class Recipe:
    name: str
    demos: tuple[DemoSet, ...]
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields
    arch: dict[str, Any] = field(default_factory=dict)  # small_arch changes (TrainConfig.arch_changes)
    description: str = ""
    # Training continued in stages: each stage's TrainConfig fields over ``train``; every stage after the first
    # starts from the one before (its ``init``). Empty: one run with ``train``.
    stages: tuple[dict[str, Any], ...] = ()


def stage_plan(recipe: Recipe | None, base: dict[str, Any], explicit: dict[str, Any],
               out: str | Path) -> list[tuple[dict[str, Any], str]]:
    """The training runs of a recipe: (TrainConfig fields, output directory) per stage, in order.

    Precedence per stage: ``explicit`` (the command line) > the stage's fields > ``recipe.train`` > ``base``
    (the defaults). Stages before the last write to ``<out>_stage<k>``, the last to ``out``; a stage after the
    first starts from the previous stage's output (an explicit ``init`` applies to the first stage only).
    """
    train = dict(recipe.train) if recipe is not None else {}
    stages = (recipe.stages if recipe is not None else ()) or ({},)
    plan: list[tuple[dict[str, Any], str]] = []
    for k, stage in enumerate(stages):
        values = {**base, **train, **stage, **explicit}
        if k > 0:
            values["init"] = plan[-1][1]
        plan.append((values, str(out) if k == len(stages) - 1 else f"{out}_stage{k + 1}"))
    return plan


RECIPES: dict[str, Recipe] = {
    "so101": Recipe(
        name="so101",
        demos=(DemoSet(0, 200), DemoSet(10000, 200), DemoSet(20000, 400), DemoSet(30000, 600),
               DemoSet(40000, 600, perturb=True), DemoSet(60000, 600, regrasp=True),
               DemoSet(70000, 600, regrasp=True)),
        train={"steps": 18000, "batch": 32, "lr": 5e-4, "warmup": 300, "seed": 0, "shift": 0, "ema": 0.999,
               "image_size": 64, "aux_weight": 1.0, "aux_pose": True, "decision_weight": 3.0, "threads": 1,
               "save_every": 1000, "attention": "fused"},
        description="effvla_ros/assets/so101_pickplace: 3200 scripted demos (64 px; 1400 clean, 600 DART-perturbed, "
                    "1200 re-grasp), small SmolVLA from scratch with the training-only grounding loss",
    ),
}
# The bundled checkpoints (``effvla_ros/assets/<name>``); a recipe that fine-tunes one starts from it (``init``).
ASSETS = Path(__file__).resolve().parents[1] / "assets"

# effvla_ros/assets/so101_pickplace_pruned: the bundled so101 checkpoint fine-tuned for task-relevance pruning on
# the same demos (three quarters of the samples on the runtime-pruned prefix, the pruning's scores aligned with
# the instructed cube and place in the scene camera and, through forward kinematics of the recorded joint
# positions, in the wrist camera): two stages of 6000 steps, the second at half the learning rate.
RECIPES["so101_pruned"] = Recipe(
    name="so101_pruned", demos=RECIPES["so101"].demos,
    train={**RECIPES["so101"].train, "init": str(ASSETS / "so101_pickplace"), "steps": 6000, "warmup": 100,
           "prune_train": 0.75, "prune_align": 0.2, "prune_align_wrist": 0.2},
    stages=({"lr": 2e-4}, {"lr": 1e-4}),
    description="effvla_ros/assets/so101_pickplace_pruned: effvla_ros/assets/so101_pickplace fine-tuned on the so101 "
                "demos with --prune-train 0.75 --prune-align 0.2 --prune-align-wrist 0.2, 6000 steps at lr 2e-4 "
                "then 6000 at 1e-4",
)

# effvla_ros/assets/so101_pickplace_rtc: so101_pickplace_pruned fine-tuned for closed loop under inference delay
# (issue #31): a 20-action chunk (2 s at 10 Hz, room for delays up to the 5-step horizon and beyond) and training-time
# real-time chunking (arXiv 2512.05964: a committed prefix of d ~ U{0..8} clean actions, out of the loss), on a
# subset of the so101 demos, with the pruning-aware samples of so101_pruned kept.
RECIPES["so101_rtc"] = Recipe(
    name="so101_rtc", demos=(DemoSet(30000, 600), DemoSet(40000, 300, perturb=True), DemoSet(60000, 300, regrasp=True)),
    train={**RECIPES["so101_pruned"].train, "init": str(ASSETS / "so101_pickplace_pruned"), "steps": 6000,
           "warmup": 100, "lr": 1e-4, "rtc_train_max_delay": 8},
    arch={"chunk_size": 20, "n_action_steps": 5},
    description="effvla_ros/assets/so101_pickplace_rtc: effvla_ros/assets/so101_pickplace_pruned fine-tuned with a "
                "20-action chunk and training-time RTC (--rtc-train-max-delay 8) on 1200 so101 demos, 6000 steps "
                "at lr 1e-4",
)


def _complete(root: Path, ds: DemoSet) -> bool:
    try:
        index = json.loads((root / "index.json").read_text())
    except (OSError, ValueError):
        return False
    from effvla_ros.sim.scene import SCENE_VERSION  # imports MuJoCo

    eps = index.get("episodes", [])
    gen = index.get("generator", {})
    return (len(eps) >= ds.episodes and int(index.get("image_size", -1)) == ds.image_size
            and gen.get("base_seed") == ds.seed and gen.get("scene_version") == SCENE_VERSION
            and (gen.get("perturb") is not None) == ds.perturb
            and (gen.get("regrasp") is not None) == ds.regrasp
            and tuple(gen.get("aim_offset", (0.0, 0.0))) == tuple(map(float, ds.aim_offset))
            and all((root / e["file"]).exists() for e in eps[: ds.episodes]))


def ensure_demos(recipe: Recipe, demos_root: str | Path, *, workers: int = 2, progress: bool = True,
                 log: Callable[[str], None] = print) -> list[str]:
    """The recipe's demo directories under ``demos_root``, generating the missing / incomplete ones."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    out = []
    for ds in recipe.demos:
        root = Path(demos_root) / ds.name
        if not _complete(root, ds):
            kind = "perturbed " if ds.perturb else ""
            kind += "re-grasp " if ds.regrasp else ""
            log(f"recipe {recipe.name}: generating {ds.episodes} {kind}demos "
                f"(seed {ds.seed}, {ds.image_size} px) "
                f"in {root} with {workers} workers")
            bar = None
            if progress:
                bar = tqdm(total=ds.episodes, unit="ep", desc="gen-demos")

            def cb(p: dict, bar: Any = bar) -> None:
                if bar is not None:
                    bar.n = p["kept"]
                    bar.refresh()

            try:
                sim_dataset.generate(root, ds.episodes, image_size=ds.image_size, seed=ds.seed,
                                     workers=max(1, workers),
                                     perturb=sim_dataset.Perturbation() if ds.perturb else None,
                                     aim_offset=ds.aim_offset, regrasp=sim_dataset.Regrasp() if ds.regrasp else None,
                                     progress=cb)
            finally:
                if bar is not None:
                    bar.close()
        out.append(str(root))
    return out
