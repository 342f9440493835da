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

from effvla_ros.core.smolvla import SmolVLAArch, SmolVLAPolicy, build_random_policy, build_tiny_tokenizer, save_policy
from effvla_ros.core.smolvla.config import ATTENTION_IMPLS, tiny_arch
from effvla_ros.train.data import ChunkDataset, compute_stats, load_demos

VLM_NAME = "effvla/so101_pickplace_vlm"


def policy_tokenizer(extra: list[str] | None = None) -> Any:
    """BPE tokenizer whose vocabulary holds every word of every task instruction as one token."""
    from effvla_ros.sim.task import all_instructions

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


def masked_loss(policy: SmolVLAPolicy, batch: dict, *, noise: torch.Tensor | None = None,
                t: torch.Tensor | None = None) -> torch.Tensor:
    """Mean flow-matching loss over the real action dimensions of the non-padded chunk steps."""
    obs = {k: v for k, v in batch.items() if k.startswith("observation.") or k == "task"}
    per = policy.flow_matching_loss(obs, batch["action"], noise=noise, t=t, train_vision=True)
    return masked_flow_loss(per, batch["action_is_pad"], policy.arch.action_dim)


def masked_flow_loss(per: torch.Tensor, action_is_pad: torch.Tensor, action_dim: int) -> torch.Tensor:
    """Mean of the per-element loss (B, S, max_action_dim) over the first ``action_dim`` dims of the chunk
    steps that are not padding (``action_is_pad`` (B, S))."""
    per = per[:, :, :action_dim]
    valid = (~action_is_pad).to(per.dtype)[:, :, None]
    return (per * valid).sum() / (valid.sum() * per.shape[-1]).clamp_min(1.0)


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
    from effvla_ros.train.color_swap import (
        RECOLORABLE,
        permute_grounding,
        random_permutation,
        recolor,
        rename_instruction,
    )
    from effvla_ros.train.grounding import COLOR_NAMES

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


def _relevance_targets(policy: SmolVLAPolicy, dataset: ChunkDataset, image_size: int, camera: str = "scene") -> Any:
    """The relevance alignment targets (:class:`~effvla_ros.train.relevance.RelevanceTargets`) of ``camera``,
    projected with the simulated camera onto the connector's token grid: the fixed ``scene`` camera, or the
    ``wrist`` camera at each frame's recorded joint positions."""
    from effvla_ros.sim.env import SimConfig, TwoCubePickPlaceEnv
    from effvla_ros.train.relevance import CameraModel, RelevanceTargets

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


def _save(policy: SmolVLAPolicy, ema: torch.nn.Module | None, out: Path, dtype: str) -> None:
    if ema is None:
        save_policy(policy, out, dtype=getattr(torch, dtype))
        return
    live = policy.weights
    policy.weights = ema  # type: ignore[assignment]
    try:
        save_policy(policy, out, dtype=getattr(torch, dtype))
    finally:
        policy.weights = live


def train(cfg: TrainConfig, *, progress: bool = True, log: Callable[[str], None] = print) -> TrainResult:
    """Train on ``cfg.data`` and write the checkpoint (LeRobot layout) + ``train_log.json`` to ``cfg.out``."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    episodes = []
    for root in [r for r in cfg.data.split(",") if r]:  # several demo directories: comma-separated
        eps, index = load_demos(root)
        if int(index["image_size"]) != cfg.image_size:
            raise ValueError(f"{root}: images are {index['image_size']} px, --image-size is {cfg.image_size}")
        episodes += eps
    episodes = episodes[: cfg.max_episodes] if cfg.max_episodes else episodes
    probe = small_arch(**cfg.arch_changes)
    dataset = ChunkDataset(episodes, probe.chunk_size)
    if cfg.init:
        from effvla_ros.core.smolvla import RuntimeConfig, load_policy

        policy = load_policy(cfg.init, runtime=RuntimeConfig())
        if policy.arch.chunk_size != dataset.chunk_size or tuple(policy.arch.cameras) != tuple(dataset.cameras):
            raise ValueError(f"--init {cfg.init}: chunk size / cameras differ from the data's")
        for p in policy.weights.parameters():
            p.requires_grad_(True)
    else:
        policy = build_policy(dataset, cfg.image_size, cfg.seed, **cfg.arch_changes)
    if cfg.device != "cpu":
        policy.apply_runtime(dataclasses.replace(policy.runtime, device=cfg.device))
    dev = policy.device
    policy.fused_attention = cfg.attention == "fused"
    params = [p for p in policy.weights.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    heads = targets = None
    aux_layer = aux_camera = None
    if cfg.aux_weight > 0:
        from effvla_ros.train.grounding import GroundingHeads, GroundingTargets

        jaw_fn = None
        fk_env = None
        if cfg.aux_wrist:
            if "wrist" not in policy.arch.cameras:
                raise ValueError("--aux-wrist needs a 'wrist' camera in the demos")
            from effvla_ros.sim.env import SimConfig, TwoCubePickPlaceEnv

            fk_env = TwoCubePickPlaceEnv(SimConfig(image_size=16, cameras=["scene"]))  # forward kinematics only
            jaw_fn = fk_env.jaw_points
        try:
            targets = GroundingTargets(dataset.episodes, pose=cfg.aux_pose, jaw_fn=jaw_fn)
        finally:
            if fk_env is not None:
                fk_env.close()
        if targets.num_with_targets == 0:
            raise ValueError("--aux-weight needs demos with env.cube_positions and reproducible seeds")
        aux_camera = "scene" if "scene" in policy.arch.cameras else policy.arch.cameras[0]
        probe_batch = dataset.batch([0])
        with torch.no_grad():
            enc = policy.encode_images({c: probe_batch[f"observation.images.{c}"] for c in policy.arch.cameras})
        n_tok, d_vlm = enc.tokens[aux_camera].shape[1:]
        nl = policy.arch.num_vlm_layers
        aux_layer = cfg.aux_layer % nl
        heads = GroundingHeads(int(n_tok), int(d_vlm),
                               wrist_tokens=int(enc.tokens["wrist"].shape[1]) if cfg.aux_wrist else 0).to(dev)
        log(f"train: grounding loss x{cfg.aux_weight} ({targets.num_with_targets}/{len(dataset.episodes)} "
            f"episodes with targets; heads on {aux_camera} tokens and VLM layer {aux_layer}, not saved)")
    head_params = list(heads.parameters()) if heads is not None else []
    decay = [p for p in params if p.ndim >= 2] + [p for p in head_params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2] + [p for p in head_params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95),
                            fused=True)  # one kernel for every tensor: 1.4 ms instead of 9 ms per step here
    sample_p = None
    if cfg.decision_weight != 1.0:
        dec = decision_frames(dataset, cfg.decision_window)
        w = np.where(dec, cfg.decision_weight, 1.0)
        sample_p = w / w.sum()
        log(f"train: {int(dec.sum())} decision frames sampled x{cfg.decision_weight}")
    swap_colors: list[tuple[str, str] | None] = []
    if cfg.color_swap > 0:
        from effvla_ros.train.grounding import episode_spec

        specs = [episode_spec(e) for e in dataset.episodes]
        swap_colors = [s.cube_colors if s is not None else None for s in specs]
        n_ok = sum(c is not None for c in swap_colors)
        if n_ok == 0:
            raise ValueError("--color-swap needs demos whose seed reproduces their task (effvla gen-demos)")
        log(f"train: cube colours permuted in {cfg.color_swap:.0%} of the samples ({n_ok}/{len(swap_colors)} "
            f"episodes eligible)")
    prune_cfg = None
    if cfg.prune_train > 0:
        from effvla_ros.core.compression.pruning import PruningConfig

        prune_cfg = PruningConfig(keep_ratio=cfg.prune_keep_ratio)
        log(f"train: {cfg.prune_train:.0%} of the samples see the pruned prefix (task relevance, keep ratio "
            f"{cfg.prune_keep_ratio})")
    from effvla_ros.train.relevance import stat_name

    rel_targets: dict[str, Any] = {}
    align = {"scene": cfg.prune_align, "wrist": cfg.prune_align_wrist}
    for cam, weight in align.items():
        if weight > 0:
            rel_targets[cam] = _relevance_targets(policy, dataset, cfg.image_size, cam)
            log(f"train: relevance alignment x{weight} on the {cam} camera's tokens "
                f"({rel_targets[cam].num_with_targets}/{len(dataset.episodes)} episodes with targets)")
    ema = copy.deepcopy(policy.weights) if cfg.ema > 0 else None
    ema_params: list[torch.Tensor] = []
    live_params: list[torch.Tensor] = []
    if ema is not None:
        for p in ema.parameters():
            p.requires_grad_(False)
        ema_params = list(ema.parameters())
        live_params = [p.detach() for p in policy.weights.parameters()]
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    log(f"train: {len(episodes)} episodes, {len(dataset)} samples, {len(dataset.tasks)} instructions; "
        f"{n_params / 1e6:.2f} M parameters; {cfg.steps} steps of batch {cfg.batch}")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, unit="step", desc="train", mininterval=2.0)
    history: list[dict[str, float]] = []
    window: list[torch.Tensor] = []  # per-step losses, kept on the device until logged (no wait per step)
    aux_window: list[dict[str, torch.Tensor]] = []
    t0 = time.perf_counter()
    perm = rng.permutation(len(dataset))
    pos = 0
    step = 0
    lr = 0.0
    policy.weights.train()
    try:
        for step in range(cfg.steps):
            if sample_p is not None:
                idx = rng.choice(len(dataset), size=cfg.batch, p=sample_p)
            else:
                if pos + cfg.batch > len(perm):
                    perm, pos = rng.permutation(len(dataset)), 0
                idx = perm[pos: pos + cfg.batch]
                pos += cfg.batch
            batch = dataset.batch(idx, shift=cfg.shift, rng=rng)
            pairs = dataset.index[np.asarray(idx)]
            grounding = targets.batch(pairs) if targets is not None else None
            relevance = {c: r.batch(pairs).to(dev) for c, r in rel_targets.items()} or None
            if cfg.color_swap > 0:
                apply_color_swap(batch, pairs, swap_colors, cfg.color_swap, rng, grounding)
            if cfg.state_dropout > 0:
                drop = torch.from_numpy(rng.random(len(idx)) < cfg.state_dropout)
                mean = policy.normalizer.stats["observation.state"]["mean"]
                batch["observation.state"][drop] = mean.to(batch["observation.state"].dtype)
            if dev.type != "cpu":
                batch = {k: v.to(dev, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
                if grounding is not None:
                    grounding = (grounding[0].to(dev), grounding[1].to(dev))
            tf = (time.perf_counter() - t0) / (60 * cfg.max_minutes) if cfg.max_minutes > 0 else 0.0
            lr = lr_at(step, cfg, tf)
            for g in opt.param_groups:
                g["lr"] = lr
            if grounding is not None or prune_cfg is not None or relevance is not None:  # grounding: set exactly
                # when the heads are
                from effvla_ros.train.grounding import flow_and_grounding_loss

                tg, mk = grounding if grounding is not None else (None, None)
                prune = None
                if prune_cfg is not None:
                    prune = (prune_cfg, torch.from_numpy(rng.random(len(idx)) < cfg.prune_train))
                flow, aux, aux_stats = flow_and_grounding_loss(policy, batch, heads, tg, mk, layer=int(aux_layer or 0),
                                                               camera=str(aux_camera or "scene"), prune=prune,
                                                               wrist_camera="wrist" if cfg.aux_wrist else None,
                                                               relevance=relevance)
                loss = flow + cfg.aux_weight * aux
                for cam in rel_targets:
                    key = stat_name("relevance_loss", cam)
                    rel = aux_stats.pop(key)
                    loss = loss + align[cam] * rel
                    aux_stats[key] = rel.detach()
                aux_window.append(aux_stats)
                loss_value = flow.detach()
            else:
                loss = masked_loss(policy, batch)
                loss_value = loss.detach()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(params + head_params, cfg.grad_clip)
            opt.step()
            if ema is not None:
                d = min(cfg.ema, (1 + step) / (10 + step))
                with torch.no_grad():
                    torch._foreach_lerp_(ema_params, live_params, 1 - d)
            window.append(loss_value)
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                rec = {"step": step + 1, "loss": _mean(window), "lr": lr,
                       "grad_norm": float(gnorm), "wall_s": time.perf_counter() - t0}
                if aux_window:
                    for k in sorted({k for a in aux_window for k in a}):
                        rec[k] = _mean([a[k] for a in aux_window if k in a])
                history.append(rec)
                window, aux_window = [], []
                if bar is not None:
                    post = {"loss": f"{rec['loss']:.4f}", "lr": f"{rec['lr']:.1e}"}
                    if "aux_target_goal" in rec:
                        post["aux_tg"] = f"{rec['aux_target_goal']:.3f}"
                    bar.set_postfix(**post)
            if bar is not None:
                bar.update(1)
            if cfg.save_every > 0 and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
                _save(policy, ema, out, cfg.save_dtype)
                _write_log(out, cfg, policy, history, n_params, len(episodes), len(dataset), step + 1,
                           time.perf_counter() - t0, final=False)
            if cfg.max_minutes > 0 and time.perf_counter() - t0 > 60 * cfg.max_minutes:
                log(f"train: time limit of {cfg.max_minutes} min reached after {step + 1} steps")
                break
    finally:
        if bar is not None:
            bar.close()
    steps_done = step + 1
    if window:
        history.append({"step": steps_done, "loss": _mean(window), "lr": lr,
                        "grad_norm": float("nan"), "wall_s": time.perf_counter() - t0})
    policy.weights.eval()
    policy.fused_attention = policy.runtime.attention == "fused"  # the returned policy infers as its runtime says
    if ema is not None:
        ema.eval()
        policy.weights = ema  # the saved / returned weights are the EMA
    wall = time.perf_counter() - t0
    save_policy(policy, out, dtype=getattr(torch, cfg.save_dtype))
    _write_log(out, cfg, policy, history, n_params, len(episodes), len(dataset), steps_done, wall, final=True)
    final = history[-1]["loss"] if history else float("nan")
    log(f"train: {steps_done} steps in {wall / 60:.1f} min, final loss {final:.4f}; checkpoint in {out}")
    return TrainResult(policy, out, steps_done, wall, final, history, n_params)


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
