"""Training of a small SmolVLA-architecture policy from scratch on simulated demonstrations (ROS-free).

Everything is trained (vision tower, connector, VLM layers, action expert, projections): with random
VLM weights there is nothing to freeze. The objective is LeRobot's flow-matching loss
(:meth:`SmolVLAPolicy.flow_matching_loss`), masked on padded chunk steps and restricted to the real
action dimensions; AdamW with linear warmup and cosine decay; an exponential moving average (EMA) of
the weights is what gets saved (the usual practice for diffusion / flow policies).

Optional, training only (the saved checkpoint is the same model either way):

* ``aux_weight > 0``: an auxiliary grounding loss from privileged simulator information
  (:mod:`effvla_ros.train.grounding`: object positions regressed from the scene camera's visual
  tokens and from the VLM's state-token hidden state), weighted by ``aux_weight`` and added to the
  flow-matching loss; its heads are discarded at the end (not in ``model.safetensors``); ``aux_wrist``
  adds the instructed cube relative to the jaw point, regressed from the wrist camera's tokens;
* ``decision_weight > 1``: frames at the decision points (the first ``chunk_size`` frames of an
  episode and the ``chunk_size`` frames after the gripper starts closing) are sampled that many
  times more often than the others;
* ``color_swap > 0``: that fraction of the samples has its cube colours permuted, in both cameras'
  images, the instruction and the grounding targets alike (:mod:`effvla_ros.train.color_swap`; needs
  demos whose seed reproduces their task);
* ``prune_train > 0``: that fraction of the samples sees only the visual tokens that the runtime's
  task-relevance pruning keeps at ``prune_keep_ratio`` (:mod:`effvla_ros.train.prune_aware`), so that the
  policy also works from the pruned prefix.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from effvla_ros.core.compression.pruning import PruningConfig
from effvla_ros.core.flow import rtc_training_time, sample_flow_time
from effvla_ros.core.smolvla import (
    RuntimeConfig,
    SmolVLAArch,
    SmolVLAPolicy,
    SmolVLAWeights,
    build_random_policy,
    build_tiny_tokenizer,
    load_policy,
    save_policy,
)
from effvla_ros.core.smolvla.config import ATTENTION_IMPLS, tiny_arch
from effvla_ros.sim.task import all_instructions
from effvla_ros.train.color_swap import RECOLORABLE, permute_grounding, random_permutation, recolor, rename_instruction
from effvla_ros.train.data import ChunkDataset, compute_stats, load_demos
from effvla_ros.train.grounding import COLOR_NAMES, GroundingHeads, GroundingTargets, flow_and_grounding_loss
from effvla_ros.train.layout import episode_spec
from effvla_ros.train.losses import masked_loss
from effvla_ros.train.relevance import CameraModel, RelevanceTargets, stat_name

__all__ = [  # masked_loss: the plain objective (effvla_ros.train.losses), importable from here as before
    "ATTENTION_CHOICES", "VLM_NAME", "TrainConfig", "TrainResult", "apply_color_swap", "build_policy",
    "decision_frames", "lr_at", "masked_loss", "policy_tokenizer", "small_arch", "train",
]

VLM_NAME = "effvla/so101_pickplace_vlm"


def policy_tokenizer(extra: list[str] | None = None) -> Any:
    """BPE tokenizer whose vocabulary holds every word of every task instruction as one token."""
    return build_tiny_tokenizer(corpus=list(all_instructions()) + list(extra or []), vocab_size=500)


def small_arch(*, image_size: int = 64, cameras: tuple[str, ...] = ("scene", "wrist"), vocab_size: int = 338,
               image_token_id: int = 336, **changes: Any) -> SmolVLAArch:
    """The architecture trained here (2-CPU-core budget), built from :func:`tiny_arch`.

    Vision: 32-d x 2 layers, patch 8 (64 px -> 8x8 patches), pixel shuffle 2 -> 16 tokens per camera.
    VLM: 64-d (4 heads / 2 KV heads, head_dim 16) x 4 layers. Expert: 48-d x 4 layers (cross-attention
    every other layer, as SmolVLA). Chunk 10 actions (1 s at 10 Hz), 5 executed per inference.
    (Measured on the shared 2-core machine: a 96-d VLM / 64-d vision variant costs ~3x more per step.)
    """
    arch = tiny_arch(
        vision_hidden_size=32, vision_intermediate_size=64, vision_num_layers=2, vision_num_heads=2,
        image_size=image_size, patch_size=8, scale_factor=2,
        text_hidden_size=64, text_intermediate_size=128, text_total_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=vocab_size, image_token_id=image_token_id,
        num_vlm_layers=4, chunk_size=10, n_action_steps=5, num_steps=10,
        resize_imgs_with_padding=(image_size, image_size), tokenizer_max_length=16, pad_language_to="max_length",
        cameras=tuple(cameras), camera_shape=(3, image_size, image_size), vlm_model_name=VLM_NAME,
        state_dim=6, action_dim=6,
    )
    return arch.replace(**changes) if changes else arch


ATTENTION_CHOICES = ATTENTION_IMPLS  # TrainConfig.attention / effvla train --attention


@dataclass
class TrainConfig:
    data: str  # demo directory (several: comma-separated)
    out: str
    steps: int = 6000
    batch: int = 32
    lr: float = 5e-4
    weight_decay: float = 1e-4
    warmup: int = 300
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0
    image_size: int = 64
    seed: int = 0
    shift: int = 4  # random-shift augmentation in pixels (0: off)
    state_dropout: float = 0.0  # probability that a sample's state is replaced by the data mean (anti-shortcut)
    ema: float = 0.999  # EMA decay of the saved weights (0: off)
    save_every: int = 1000
    log_every: int = 50
    max_episodes: int | None = None
    threads: int = 0  # torch CPU threads (0: leave as is)
    max_minutes: float = 0.0  # stop (and save) after this wall time (0: no limit)
    save_dtype: str = "float32"
    init: str | None = None  # start from this checkpoint's weights and statistics (continued training)
    arch_changes: dict[str, Any] = field(default_factory=dict)
    aux_weight: float = 0.0  # weight of the training-only grounding loss (0: off), see module docstring
    aux_pose: bool = False  # also regress the grasp / release joint poses (see effvla_ros.train.grounding)
    aux_wrist: bool = False  # also regress the instructed cube relative to the jaw point from the wrist camera
    aux_layer: int = -2  # VLM layer whose state-token output feeds the prefix grounding head (<0: from the end)
    decision_weight: float = 1.0  # sampling weight of decision frames relative to the others
    decision_window: int = 0  # frames oversampled from each decision point (0: the chunk size)
    color_swap: float = 0.0  # fraction of samples with permuted cube colours (images + instruction), 0: off
    prune_train: float = 0.0  # fraction of samples trained on the runtime-pruned prefix (0: off)
    prune_keep_ratio: float = 0.5  # pruning.keep_ratio used for those samples (the runtime default)
    attention: str = "eager"  # "fused": VLM / expert attention through torch SDPA while training (faster)
    prune_align: float = 0.0  # weight of the relevance alignment loss (effvla_ros.train.relevance; 0: off)
    prune_align_wrist: float = 0.0  # the same on the wrist camera's tokens (its pose by forward kinematics)
    device: str = "cpu"  # torch device of the training step ("cuda": batches are built on the CPU and copied)
    # training-time real-time chunking (arXiv 2512.05964): each sample's first d ~ U{0..N} actions are a committed
    # prefix given clean (flow time 0) and left out of the loss; the checkpoint declares N (rtc.mode: trained)
    rtc_train_max_delay: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.color_swap <= 1.0:
            raise ValueError(f"color_swap: must be in [0, 1], got {self.color_swap}")
        if not 0.0 <= self.prune_train <= 1.0:
            raise ValueError(f"prune_train: must be in [0, 1], got {self.prune_train}")
        if not 0.05 <= self.prune_keep_ratio <= 1.0:
            raise ValueError(f"prune_keep_ratio: must be in [0.05, 1], got {self.prune_keep_ratio}")
        if self.decision_window < 0:
            raise ValueError(f"decision_window: must be >= 0 (0: the chunk size), got {self.decision_window}")
        if self.decision_weight <= 0:
            raise ValueError(f"decision_weight: must be positive, got {self.decision_weight}")
        if self.aux_weight < 0:
            raise ValueError(f"aux_weight: must be >= 0, got {self.aux_weight}")
        if self.state_dropout > 0 and self.arch_changes.get("relative_action_dims"):
            raise ValueError("state_dropout: relative actions are labelled from the state, it cannot be dropped")
        if self.attention not in ATTENTION_CHOICES:
            raise ValueError(f"attention: must be one of {ATTENTION_CHOICES}, got {self.attention!r}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device: must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.prune_align < 0:
            raise ValueError(f"prune_align: must be >= 0, got {self.prune_align}")
        if self.prune_align_wrist < 0:
            raise ValueError(f"prune_align_wrist: must be >= 0, got {self.prune_align_wrist}")
        if self.aux_wrist and self.aux_weight <= 0:
            raise ValueError("aux_wrist: needs aux_weight > 0 (it is a term of the grounding loss)")
        if self.rtc_train_max_delay < 0:
            raise ValueError(f"rtc_train_max_delay: must be >= 0, got {self.rtc_train_max_delay}")


@dataclass
class TrainResult:
    policy: SmolVLAPolicy
    out: Path
    steps: int
    wall_s: float
    final_loss: float
    history: list[dict[str, float]]
    num_params: int


def lr_at(step: int, cfg: TrainConfig, time_fraction: float = 0.0) -> float:
    """Linear warmup to ``lr`` then cosine decay to ``lr * min_lr_ratio`` at ``steps``.

    ``time_fraction`` (elapsed / ``max_minutes``) advances the decay when the wall-time budget would
    end training before ``steps``, so that a time-limited run still ends annealed.
    """
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    p = min(1.0, max((step - cfg.warmup) / max(1, cfg.steps - cfg.warmup), time_fraction))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def decision_frames(dataset: ChunkDataset, window: int = 0) -> np.ndarray:
    """(len(dataset),) bool: the first ``window`` trained frames of each episode (from its ``train_start``)
    and the ``window`` frames from the step where the commanded gripper angle first drops (the grasp; the
    transport starts). ``window`` 0: the chunk size."""
    h = int(window) or dataset.chunk_size
    out = np.zeros(len(dataset), dtype=bool)
    ei, t = dataset.index[:, 0], dataset.index[:, 1]
    start = np.asarray([e.train_start for e in dataset.episodes], dtype=np.int64)[ei]
    out |= t < start + h
    for k, e in enumerate(dataset.episodes):
        grasp = e.grasp_frame()
        if grasp is not None:
            c = grasp - 1  # the last open frame: its chunk starts the close
            out |= (ei == k) & (t >= c) & (t < c + h)
    return out


def apply_color_swap(batch: dict, index_pairs: np.ndarray, colors: Sequence[tuple[str, str] | None],
                     prob: float, rng: np.random.Generator, grounding: tuple[torch.Tensor, torch.Tensor] | None = None
                     ) -> int:
    """Permute the cube colours of a random ``prob`` fraction of ``batch``'s samples in place (images of every
    camera, ``task``, and the per-colour ``grounding`` targets / mask if given); return how many samples
    changed. ``colors[e]``: the cube colours of episode ``e`` (None: never recoloured)."""
    cams = [k for k in batch if k.startswith("observation.images.")]
    changed = 0
    for i, (ei, _) in enumerate(index_pairs):
        cc = colors[int(ei)]
        if cc is None or rng.random() >= prob:
            continue
        perm = random_permutation(rng)
        mapping = {a: perm[a] for a in cc if a in RECOLORABLE and perm[a] != a}  # the colours in the scene
        if not mapping:
            continue
        for k in cams:
            batch[k][i] = recolor(batch[k][i], mapping)
        batch["task"][i] = rename_instruction(batch["task"][i], mapping)
        if grounding is not None:
            tg, mk = grounding
            tg[i], mk[i] = permute_grounding(tg[i], mk[i], perm, COLOR_NAMES)
        changed += 1
    return changed


def _relevance_targets(policy: SmolVLAPolicy, dataset: ChunkDataset, image_size: int,
                       camera: str = "scene") -> RelevanceTargets:
    """The relevance alignment targets (:class:`~effvla_ros.train.relevance.RelevanceTargets`) of ``camera``,
    projected with the simulated camera onto the connector's token grid: the fixed ``scene`` camera, or the
    ``wrist`` camera at each frame's recorded joint positions."""
    from effvla_ros.sim.env import SimConfig, TwoCubePickPlaceEnv  # imports MuJoCo

    arch = policy.arch
    flag = "prune_align" if camera == "scene" else f"prune_align_{camera}"
    if camera not in arch.cameras:
        raise ValueError(f"{flag}: needs a {camera!r} camera")
    if arch.resize_imgs_with_padding not in (None, (image_size, image_size)):
        raise ValueError(f"{flag}: the images must reach the vision tower unresized")
    side = arch.patches_per_side // arch.scale_factor
    env = TwoCubePickPlaceEnv(SimConfig(image_size=16, cameras=["scene"]))  # poses and kinematics only
    try:  # the fixed scene camera, or the wrist camera at each episode's recorded joint positions
        cam = CameraModel.from_env(env, camera) if camera == "scene" else (
            lambda ep: CameraModel.along(env, ep.state, camera))
        out = RelevanceTargets(dataset.episodes, cam, image_size, (side, side))
    finally:
        env.close()
    if out.num_with_targets == 0:
        raise ValueError(f"{flag}: needs demos with env.cube_positions and reproducible seeds")
    return out


def build_policy(dataset: ChunkDataset, image_size: int, seed: int, **arch_changes: Any) -> SmolVLAPolicy:
    tok = policy_tokenizer()
    arch = small_arch(image_size=image_size, cameras=tuple(dataset.cameras), vocab_size=len(tok),
                      image_token_id=int(tok.convert_tokens_to_ids("<image>")), **arch_changes)
    if arch.chunk_size != dataset.chunk_size:
        raise ValueError("dataset chunk size differs from the architecture's")
    stats = compute_stats(dataset.episodes, relative_dims=arch.relative_action_dims, chunk_size=arch.chunk_size)
    policy = build_random_policy(arch, tokenizer=tok, stats=stats, seed=seed, init="transformers")
    for p in policy.weights.parameters():
        p.requires_grad_(True)
    return policy


# ------------------------------------------------------------------------------------------------- setup
@dataclass
class _Extras:
    """The optional, training-only parts of the objective and of the sampling (see the module docstring)."""

    heads: GroundingHeads | None = None          # grounding heads (aux_weight > 0), trained alongside, not saved
    targets: GroundingTargets | None = None      # their targets, per sample
    aux_layer: int = 0                           # VLM layer whose state-token output feeds heads.prefix
    aux_camera: str = "scene"                    # camera whose tokens feed heads.visual
    sample_p: np.ndarray | None = None           # per-sample probabilities (decision_weight != 1), else a permutation
    swap_colors: list[tuple[str, str] | None] = field(default_factory=list)  # per episode (color_swap > 0)
    prune: PruningConfig | None = None           # the runtime pruning of the pruned samples (prune_train > 0)
    relevance: dict[str, RelevanceTargets] = field(default_factory=dict)    # camera -> targets (prune_align*)
    align: dict[str, float] = field(default_factory=dict)                   # camera -> weight of its alignment loss

    @property
    def head_params(self) -> list[torch.nn.Parameter]:
        return list(self.heads.parameters()) if self.heads is not None else []

    @property
    def one_pass(self) -> bool:
        """Whether a step needs :func:`flow_and_grounding_loss` (else :func:`masked_loss`)."""
        return self.targets is not None or self.prune is not None or bool(self.relevance)


class _Ema:
    """Exponential moving average of the policy's weights (what gets saved); decay ``min(decay, (1 + step) /
    (10 + step))``, so that the first steps are not averaged with the random initialization."""

    def __init__(self, weights: SmolVLAWeights, decay: float) -> None:
        self.decay = decay
        self.weights = copy.deepcopy(weights)
        for p in self.weights.parameters():
            p.requires_grad_(False)
        self._avg: list[torch.Tensor] = list(self.weights.parameters())
        self._live = [p.detach() for p in weights.parameters()]

    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(self._avg, self._live, 1 - d)


@dataclass
class _Run:
    """Everything a training run sets up before its first step."""

    cfg: TrainConfig
    dataset: ChunkDataset
    policy: SmolVLAPolicy
    params: list[torch.nn.Parameter]  # the policy's trained parameters
    n_params: int
    extras: _Extras
    opt: torch.optim.Optimizer
    ema: _Ema | None
    out: Path


def _save(policy: SmolVLAPolicy, ema: SmolVLAWeights | None, out: Path, dtype: str) -> None:
    if ema is None:
        save_policy(policy, out, dtype=getattr(torch, dtype))
        return
    live = policy.weights
    policy.weights = ema
    try:
        save_policy(policy, out, dtype=getattr(torch, dtype))
    finally:
        policy.weights = live


def _load_dataset(cfg: TrainConfig) -> ChunkDataset:
    episodes = []
    for root in [r for r in cfg.data.split(",") if r]:  # several demo directories: comma-separated
        eps, index = load_demos(root)
        if int(index["image_size"]) != cfg.image_size:
            raise ValueError(f"{root}: images are {index['image_size']} px, --image-size is {cfg.image_size}")
        episodes += eps
    episodes = episodes[: cfg.max_episodes] if cfg.max_episodes else episodes
    return ChunkDataset(episodes, small_arch(**cfg.arch_changes).chunk_size)


def _init_policy(cfg: TrainConfig, dataset: ChunkDataset) -> SmolVLAPolicy:
    """A new random policy, or ``cfg.init``'s (continued training), trainable, on ``cfg.device``."""
    if cfg.init:
        policy = load_policy(cfg.init, runtime=RuntimeConfig())
        # the action chunk's length is no weight's shape (per-token projections, RoPE positions): a fine-tune may
        # change it (and the execution horizon); nothing else of the architecture
        horizon = {k: v for k, v in cfg.arch_changes.items() if k in ("chunk_size", "n_action_steps")}
        if horizon:
            policy.arch = policy.arch.replace(**horizon)
        if policy.arch.chunk_size != dataset.chunk_size or tuple(policy.arch.cameras) != tuple(dataset.cameras):
            raise ValueError(f"--init {cfg.init}: chunk size / cameras differ from the data's")
        for p in policy.weights.parameters():
            p.requires_grad_(True)
    else:
        policy = build_policy(dataset, cfg.image_size, cfg.seed, **cfg.arch_changes)
    if cfg.rtc_train_max_delay:
        policy.arch = policy.arch.replace(rtc_trained_max_delay=cfg.rtc_train_max_delay)
    policy.arch.validate()  # after the changes a fine-tune may make
    if cfg.device != "cpu":
        policy.apply_runtime(dataclasses.replace(policy.runtime, device=cfg.device))
    policy.fused_attention = cfg.attention == "fused"
    return policy


def _grounding_setup(cfg: TrainConfig, policy: SmolVLAPolicy, dataset: ChunkDataset, extras: _Extras,
                     log: Callable[[str], None]) -> None:
    """The grounding heads and targets (``aux_weight > 0``)."""
    jaw_fn = None
    fk_env = None
    if cfg.aux_wrist:
        if "wrist" not in policy.arch.cameras:
            raise ValueError("--aux-wrist needs a 'wrist' camera in the demos")
        from effvla_ros.sim.env import SimConfig, TwoCubePickPlaceEnv  # imports MuJoCo

        fk_env = TwoCubePickPlaceEnv(SimConfig(image_size=16, cameras=["scene"]))  # forward kinematics only
        jaw_fn = fk_env.jaw_points
    try:
        targets = GroundingTargets(dataset.episodes, pose=cfg.aux_pose, jaw_fn=jaw_fn)
    finally:
        if fk_env is not None:
            fk_env.close()
    if targets.num_with_targets == 0:
        raise ValueError("--aux-weight needs demos with env.cube_positions and reproducible seeds")
    camera = "scene" if "scene" in policy.arch.cameras else policy.arch.cameras[0]
    probe_batch = dataset.batch([0])
    with torch.no_grad():
        enc = policy.encode_images({c: probe_batch[f"observation.images.{c}"] for c in policy.arch.cameras})
    n_tok, d_vlm = enc.tokens[camera].shape[1:]
    layer = cfg.aux_layer % policy.arch.num_vlm_layers
    extras.heads = GroundingHeads(int(n_tok), int(d_vlm), wrist_tokens=int(enc.tokens["wrist"].shape[1])
                                  if cfg.aux_wrist else 0).to(policy.device)
    extras.targets, extras.aux_layer, extras.aux_camera = targets, layer, camera
    log(f"train: grounding loss x{cfg.aux_weight} ({targets.num_with_targets}/{len(dataset.episodes)} "
        f"episodes with targets; heads on {camera} tokens and VLM layer {layer}, not saved)")


def _sampling_setup(cfg: TrainConfig, dataset: ChunkDataset, extras: _Extras, log: Callable[[str], None]) -> None:
    """Decision-frame oversampling (``decision_weight``) and the colour swap's eligible episodes."""
    if cfg.decision_weight != 1.0:
        dec = decision_frames(dataset, cfg.decision_window)
        w = np.where(dec, cfg.decision_weight, 1.0)
        extras.sample_p = w / w.sum()
        log(f"train: {int(dec.sum())} decision frames sampled x{cfg.decision_weight}")
    if cfg.color_swap > 0:
        specs = [episode_spec(e) for e in dataset.episodes]
        extras.swap_colors = [s.cube_colors if s is not None else None for s in specs]
        n_ok = sum(c is not None for c in extras.swap_colors)
        if n_ok == 0:
            raise ValueError("--color-swap needs demos whose seed reproduces their task (effvla gen-demos)")
        log(f"train: cube colours permuted in {cfg.color_swap:.0%} of the samples ({n_ok}/{len(extras.swap_colors)} "
            f"episodes eligible)")


def _pruning_setup(cfg: TrainConfig, policy: SmolVLAPolicy, dataset: ChunkDataset, extras: _Extras,
                   log: Callable[[str], None]) -> None:
    """Pruning-aware training (``prune_train``) and the relevance alignment (``prune_align*``)."""
    if cfg.prune_train > 0:
        extras.prune = PruningConfig(keep_ratio=cfg.prune_keep_ratio)
        log(f"train: {cfg.prune_train:.0%} of the samples see the pruned prefix (task relevance, keep ratio "
            f"{cfg.prune_keep_ratio})")
    extras.align = {"scene": cfg.prune_align, "wrist": cfg.prune_align_wrist}
    for cam, weight in extras.align.items():
        if weight > 0:
            extras.relevance[cam] = _relevance_targets(policy, dataset, cfg.image_size, cam)
            log(f"train: relevance alignment x{weight} on the {cam} camera's tokens "
                f"({extras.relevance[cam].num_with_targets}/{len(dataset.episodes)} episodes with targets)")


def _optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter],
               head_params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW, weight decay on the matrices only (policy first, then the heads)."""
    decay = [p for p in params if p.ndim >= 2] + [p for p in head_params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2] + [p for p in head_params if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95),
                             fused=True)  # one kernel for every tensor: 1.4 ms instead of 9 ms per step here


def _setup(cfg: TrainConfig, log: Callable[[str], None]) -> _Run:
    dataset = _load_dataset(cfg)
    policy = _init_policy(cfg, dataset)
    params = [p for p in policy.weights.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    extras = _Extras()
    if cfg.aux_weight > 0:
        _grounding_setup(cfg, policy, dataset, extras, log)
    opt = _optimizer(cfg, params, extras.head_params)
    _sampling_setup(cfg, dataset, extras, log)
    _pruning_setup(cfg, policy, dataset, extras, log)
    ema = _Ema(policy.weights, cfg.ema) if cfg.ema > 0 else None
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    log(f"train: {len(dataset.episodes)} episodes, {len(dataset)} samples, {len(dataset.tasks)} instructions; "
        f"{n_params / 1e6:.2f} M parameters; {cfg.steps} steps of batch {cfg.batch}")
    return _Run(cfg, dataset, policy, params, n_params, extras, opt, ema, out)


# -------------------------------------------------------------------------------------------- one step
class _Sampler:
    """Batch indices: through a permutation of the dataset, reshuffled when the rest is shorter than a batch; or,
    with per-sample probabilities ``p``, drawn with replacement."""

    def __init__(self, n: int, batch: int, p: np.ndarray | None, rng: np.random.Generator) -> None:
        self.n, self.batch, self.p, self.rng = n, batch, p, rng
        self.perm = rng.permutation(n)
        self.pos = 0

    def next(self) -> np.ndarray:
        if self.p is not None:
            return self.rng.choice(self.n, size=self.batch, p=self.p)
        if self.pos + self.batch > len(self.perm):
            self.perm, self.pos = self.rng.permutation(self.n), 0
        idx = self.perm[self.pos: self.pos + self.batch]
        self.pos += self.batch
        return idx


@dataclass
class _Batch:
    data: dict                                            # ChunkDataset.batch, augmented, on the device
    grounding: tuple[torch.Tensor, torch.Tensor] | None   # (targets, mask) (B, N_TARGETS)
    relevance: dict[str, torch.Tensor] | None             # camera -> (B, 2) token indices
    size: int
    t: torch.Tensor | None = None                         # per-token flow time (B, S) (training-time RTC), else drawn


def _make_batch(run: _Run, idx: np.ndarray, rng: np.random.Generator) -> _Batch:
    """The samples ``idx`` with their training-only targets; shift, colour swap and state dropout applied."""
    cfg, dataset, ex, dev = run.cfg, run.dataset, run.extras, run.policy.device
    batch = dataset.batch(idx, shift=cfg.shift, rng=rng)
    pairs = dataset.index[np.asarray(idx)]
    grounding = ex.targets.batch(pairs) if ex.targets is not None else None
    relevance = {c: r.batch(pairs).to(dev) for c, r in ex.relevance.items()} or None
    if cfg.color_swap > 0:
        apply_color_swap(batch, pairs, ex.swap_colors, cfg.color_swap, rng, grounding)
    if cfg.state_dropout > 0:
        drop = torch.from_numpy(rng.random(len(idx)) < cfg.state_dropout)
        mean = run.policy.normalizer.stats["observation.state"]["mean"]
        batch["observation.state"][drop] = mean.to(batch["observation.state"].dtype)
    t = None
    if cfg.rtc_train_max_delay > 0:  # a committed prefix of d clean actions per sample, out of the loss
        delays = torch.from_numpy(rng.integers(0, cfg.rtc_train_max_delay + 1, size=len(idx)))
        t, prefix = rtc_training_time(sample_flow_time(len(idx)), delays, dataset.chunk_size)
        batch["action_is_pad"] = batch["action_is_pad"] | prefix
    if dev.type != "cpu":
        batch = {k: v.to(dev, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        if grounding is not None:
            grounding = (grounding[0].to(dev), grounding[1].to(dev))
        t = t.to(dev) if t is not None else None
    return _Batch(batch, grounding, relevance, len(idx), t)


def _loss(run: _Run, b: _Batch, rng: np.random.Generator
          ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor] | None]:
    """(loss to minimize, flow-matching loss (detached, logged as ``loss``), auxiliary stats or None)."""
    cfg, ex = run.cfg, run.extras
    if not ex.one_pass:
        loss = masked_loss(run.policy, b.data, t=b.t)
        return loss, loss.detach(), None
    tg, mk = b.grounding if b.grounding is not None else (None, None)
    prune = None
    if ex.prune is not None:
        prune = (ex.prune, torch.from_numpy(rng.random(b.size) < cfg.prune_train))
    flow, aux, stats = flow_and_grounding_loss(run.policy, b.data, ex.heads, tg, mk, layer=ex.aux_layer,
                                               camera=ex.aux_camera, prune=prune, t=b.t,
                                               wrist_camera="wrist" if cfg.aux_wrist else None,
                                               relevance=b.relevance)
    loss = flow + cfg.aux_weight * aux
    for cam in ex.relevance:
        key = stat_name("relevance_loss", cam)
        rel = stats.pop(key)
        loss = loss + ex.align[cam] * rel
        stats[key] = rel.detach()
    return loss, flow.detach(), stats


def _step(run: _Run, b: _Batch, step: int, lr: float, rng: np.random.Generator
          ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor] | None]:
    """One optimizer step at learning rate ``lr`` (and the EMA's); (flow loss, gradient norm, aux stats)."""
    for g in run.opt.param_groups:
        g["lr"] = lr
    loss, loss_value, stats = _loss(run, b, rng)
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    gnorm = torch.nn.utils.clip_grad_norm_(run.params + run.extras.head_params, run.cfg.grad_clip)
    run.opt.step()
    if run.ema is not None:
        run.ema.update(step)
    return loss_value, gnorm, stats


# ----------------------------------------------------------------------------------------------- logging
class _Log:
    """The training history: one record every ``log_every`` steps (and at the last), averaging the steps' losses
    and auxiliary stats, which stay on the device until then (no wait per step); the progress bar."""

    def __init__(self, cfg: TrainConfig, progress: bool) -> None:
        self.cfg = cfg
        self.bar = tqdm(total=cfg.steps, unit="step", desc="train", mininterval=2.0) if progress else None
        self.history: list[dict[str, float]] = []
        self.window: list[torch.Tensor] = []
        self.aux_window: list[dict[str, torch.Tensor]] = []
        self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def time_fraction(self) -> float:
        """Elapsed / ``max_minutes`` (0 without a time limit), for :func:`lr_at`."""
        return self.elapsed() / (60 * self.cfg.max_minutes) if self.cfg.max_minutes > 0 else 0.0

    def add(self, step: int, loss: torch.Tensor, stats: dict[str, torch.Tensor] | None, lr: float,
            gnorm: torch.Tensor) -> None:
        self.window.append(loss)
        if stats is not None:
            self.aux_window.append(stats)
        if (step + 1) % self.cfg.log_every == 0 or step + 1 == self.cfg.steps:
            self._record(step + 1, lr, float(gnorm))
        if self.bar is not None:
            self.bar.update(1)

    def _record(self, steps: int, lr: float, gnorm: float) -> None:
        rec = {"step": steps, "loss": _mean(self.window), "lr": lr, "grad_norm": gnorm, "wall_s": self.elapsed()}
        for k in sorted({k for a in self.aux_window for k in a}):
            rec[k] = _mean([a[k] for a in self.aux_window if k in a])
        self.history.append(rec)
        self.window, self.aux_window = [], []
        if self.bar is not None:
            post = {"loss": f"{rec['loss']:.4f}", "lr": f"{rec['lr']:.1e}"}
            if "aux_target_goal" in rec:
                post["aux_tg"] = f"{rec['aux_target_goal']:.3f}"
            self.bar.set_postfix(**post)

    def flush(self, steps: int, lr: float) -> None:
        """The steps since the last record (a run stopped by its time limit) as a last record."""
        if self.window:
            self.history.append({"step": steps, "loss": _mean(self.window), "lr": lr,
                                 "grad_norm": float("nan"), "wall_s": self.elapsed()})

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ------------------------------------------------------------------------------------------ checkpoints
def _checkpoint(run: _Run, history: list[dict[str, float]], steps: int, wall: float) -> None:
    """An intermediate checkpoint (the EMA weights) and its ``train_log.json``."""
    _save(run.policy, run.ema.weights if run.ema is not None else None, run.out, run.cfg.save_dtype)
    _write_log(run.out, run.cfg, run.policy, history, run.n_params, len(run.dataset.episodes), len(run.dataset),
               steps, wall, final=False)


def _finish(run: _Run, logbook: _Log, steps: int, lr: float, log: Callable[[str], None]) -> TrainResult:
    """Switch the policy to inference (its runtime's attention; the EMA weights), save it and the final log."""
    cfg, policy = run.cfg, run.policy
    logbook.flush(steps, lr)
    policy.weights.eval()
    policy.fused_attention = policy.runtime.attention == "fused"  # the returned policy infers as its runtime says
    if run.ema is not None:
        run.ema.weights.eval()
        policy.weights = run.ema.weights  # the saved / returned weights are the EMA
    wall = logbook.elapsed()
    save_policy(policy, run.out, dtype=getattr(torch, cfg.save_dtype))
    history = logbook.history
    _write_log(run.out, cfg, policy, history, run.n_params, len(run.dataset.episodes), len(run.dataset), steps, wall,
               final=True)
    final = history[-1]["loss"] if history else float("nan")
    log(f"train: {steps} steps in {wall / 60:.1f} min, final loss {final:.4f}; checkpoint in {run.out}")
    return TrainResult(policy, run.out, steps, wall, final, history, run.n_params)


def train(cfg: TrainConfig, *, progress: bool = True, log: Callable[[str], None] = print) -> TrainResult:
    """Train on ``cfg.data`` and write the checkpoint (LeRobot layout) + ``train_log.json`` to ``cfg.out``."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    run = _setup(cfg, log)
    logbook = _Log(cfg, progress)
    sampler = _Sampler(len(run.dataset), cfg.batch, run.extras.sample_p, rng)
    step = 0
    lr = 0.0
    run.policy.weights.train()
    try:
        for step in range(cfg.steps):
            b = _make_batch(run, sampler.next(), rng)
            lr = lr_at(step, cfg, logbook.time_fraction())
            loss, gnorm, stats = _step(run, b, step, lr, rng)
            logbook.add(step, loss, stats, lr, gnorm)
            if cfg.save_every > 0 and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
                _checkpoint(run, logbook.history, step + 1, logbook.elapsed())
            if cfg.max_minutes > 0 and logbook.elapsed() > 60 * cfg.max_minutes:
                log(f"train: time limit of {cfg.max_minutes} min reached after {step + 1} steps")
                break
    finally:
        logbook.close()
    return _finish(run, logbook, step + 1, lr, log)


def _mean(values: Sequence[torch.Tensor]) -> float:
    """Mean of 0-d tensors (NaN entries left out; NaN if all are), as a float: one wait for the device."""
    return float(torch.stack([v.float() for v in values]).nanmean())


def _write_log(out: Path, cfg: TrainConfig, policy: SmolVLAPolicy, history: list[dict[str, float]], n_params: int,
               n_episodes: int, n_samples: int, steps: int, wall: float, *, final: bool) -> None:
    arch = dataclasses.asdict(policy.arch)
    rec = {"config": dataclasses.asdict(cfg), "arch": arch, "num_params": n_params, "episodes": n_episodes,
           "samples": n_samples, "steps": steps, "wall_s": wall, "final": final,
           "torch_threads": torch.get_num_threads(),
           "device_name": torch.cuda.get_device_name(policy.device) if policy.device.type == "cuda" else "cpu",
           "history": history}
    (out / "train_log.json").write_text(json.dumps(rec, indent=1, default=str))
