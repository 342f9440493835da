"""Named training recipes: the demonstrations a checkpoint was trained on and its training settings.

``effvla train --recipe so101 --out DIR`` reproduces the bundled ``effvla_ros/assets/so101_pickplace``
checkpoint in one command: the recipe's demonstration sets are generated (scripted expert, deterministic
per seed) into ``--demos-root`` unless a complete set is already there, then training runs with the
recipe's settings (any option given explicitly on the command line overrides the recipe's value).
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


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
        from effvla_ros.sim.scene import SCENE_VERSION

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
# effvla_ros/assets/so101_pickplace_pruned: the same recipe trained for task-relevance pruning (half of the samples
# on the runtime-pruned prefix, the pruning's scores aligned with the instructed cube and place in the scene camera
# and, through forward kinematics of the recorded joint positions, in the wrist camera).
RECIPES["so101_pruned"] = Recipe(
    name="so101_pruned", demos=RECIPES["so101"].demos,
    train={**RECIPES["so101"].train, "prune_train": 0.5, "prune_align": 0.2, "prune_align_wrist": 0.2},
    description="effvla_ros/assets/so101_pickplace_pruned: the so101 recipe with --prune-train 0.5 --prune-align 0.2 "
                "--prune-align-wrist 0.2",
)


def _complete(root: Path, ds: DemoSet) -> bool:
    try:
        index = json.loads((root / "index.json").read_text())
    except (OSError, ValueError):
        return False
    from effvla_ros.sim.scene import SCENE_VERSION

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
            from effvla_ros.sim.dataset import Perturbation, Regrasp, generate

            kind = "perturbed " if ds.perturb else ""
            kind += "re-grasp " if ds.regrasp else ""
            log(f"recipe {recipe.name}: generating {ds.episodes} {kind}demos "
                f"(seed {ds.seed}, {ds.image_size} px) "
                f"in {root} with {workers} workers")
            bar = None
            if progress:
                from tqdm import tqdm

                bar = tqdm(total=ds.episodes, unit="ep", desc="gen-demos")

            def cb(p: dict, bar: Any = bar) -> None:
                if bar is not None:
                    bar.n = p["kept"]
                    bar.refresh()

            try:
                generate(root, ds.episodes, image_size=ds.image_size, seed=ds.seed, workers=max(1, workers),
                         perturb=Perturbation() if ds.perturb else None, aim_offset=ds.aim_offset,
                         regrasp=Regrasp() if ds.regrasp else None,
                         progress=cb)
            finally:
                if bar is not None:
                    bar.close()
        out.append(str(root))
    return out
