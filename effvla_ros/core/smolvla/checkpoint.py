"""LeRobot SmolVLA checkpoints: load, save, and random-weight policies.

A LeRobot 0.6.1 checkpoint directory holds ``config.json`` (SmolVLAConfig), ``model.safetensors``
(the SmolVLAPolicy state dict), ``policy_preprocessor.json`` / ``policy_postprocessor.json`` and the
normalizer statistics ``policy_*_step_<i>_(un)normalizer_processor.safetensors``. Older checkpoints keep
the statistics inside model.safetensors as ``normalize_inputs.buffer_<feature>.<stat>`` (and
``normalize_targets`` / ``unnormalize_outputs``). Only safetensors are read: pickle files are refused.

The VLM's config and tokenizer (``vlm_model_name``: a Hub id or a local path) are resolved, in order,
from: the ``vlm_dir`` argument, ``$EFFVLA_VLM_DIR``, ``<checkpoint>/vlm/``, ``vlm_model_name`` as a local
directory, the local Hugging Face cache (offline). Shapes that the weights determine (number of text
layers, vocabulary, expert width, state/action padding) are taken from the weights.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from .config import RuntimeConfig, SmolVLAArch
from .model import build_weights, randomize_
from .normalize import Normalizer
from .policy import SmolVLAPolicy

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
VLM_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
             "processor_config.json", "preprocessor_config.json", "chat_template.json", "chat_template.jinja",
             "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json")
PREFIX = "model."


class CheckpointError(RuntimeError):
    """A checkpoint or its VLM/tokenizer files could not be found or read (the message says how to fix)."""


# ------------------------------------------------------------------------------------------- VLM lookup
def _is_vlm_dir(p: Path) -> bool:
    return (p / "config.json").is_file() and ((p / "tokenizer.json").is_file()
                                              or (p / "tokenizer_config.json").is_file())


def resolve_vlm_dir(vlm_model_name: str, *, vlm_dir: str | os.PathLike[str] | None = None,
                    checkpoint_dir: str | os.PathLike[str] | None = None) -> Path:
    """Find a local directory with the VLM's ``config.json`` and tokenizer files (never downloads)."""
    looked: list[str] = []
    candidates: list[tuple[str, Path]] = []
    if vlm_dir is not None:
        candidates.append(("vlm_dir argument", Path(vlm_dir)))
    if os.environ.get("EFFVLA_VLM_DIR"):
        candidates.append(("$EFFVLA_VLM_DIR", Path(os.environ["EFFVLA_VLM_DIR"])))
    if checkpoint_dir is not None:
        candidates.append(("checkpoint's vlm/ folder", Path(checkpoint_dir) / "vlm"))
    if vlm_model_name and (vlm_model_name.startswith(("/", ".", "~")) or Path(vlm_model_name).is_dir()):
        candidates.append(("vlm_model_name as a path", Path(vlm_model_name).expanduser()))
    for what, p in candidates:
        if _is_vlm_dir(p):
            return p
        looked.append(f"{what}: {p} ({'no config.json + tokenizer files' if p.exists() else 'does not exist'})")
        if what == "vlm_dir argument":  # an explicit path that does not work is an error in itself
            raise CheckpointError(
                f"VLM directory {p} given explicitly has no config.json and tokenizer files "
                f"(tokenizer.json / tokenizer_config.json); it must hold the SmolVLM config and tokenizer "
                f"of {vlm_model_name!r}")
    if vlm_model_name and "/" in vlm_model_name and not vlm_model_name.startswith(("/", ".")):
        try:
            from huggingface_hub import snapshot_download

            snap = Path(snapshot_download(vlm_model_name, local_files_only=True,
                                          allow_patterns=list(VLM_FILES)))
            if _is_vlm_dir(snap):
                return snap
            looked.append(f"Hugging Face cache: {snap} (incomplete)")
        except Exception as e:  # noqa: BLE001 - any lookup failure is reported below
            from huggingface_hub.constants import HF_HUB_CACHE

            looked.append(f"Hugging Face cache {HF_HUB_CACHE} (offline): {type(e).__name__}")
    raise CheckpointError(
        f"cannot find the VLM config and tokenizer for vlm_model_name={vlm_model_name!r}. Looked in:\n  - "
        + "\n  - ".join(looked or ["(nowhere: no candidate location)"])
        + "\nSupply a directory holding its config.json and tokenizer files with --vlm-dir DIR (Python: "
        "vlm_dir=DIR), or set EFFVLA_VLM_DIR, or put them in <checkpoint>/vlm/, or fill the local Hugging "
        f"Face cache (e.g. `huggingface-cli download {vlm_model_name} --include '*.json'` on a machine "
        "with internet). Model weights of the VLM are not needed.")


def load_vlm_files(vlm_path: Path) -> tuple[Any, Any]:
    """(SmolVLMConfig, tokenizer) from a local directory, offline."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        cfg = AutoConfig.from_pretrained(str(vlm_path), local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"cannot read the VLM config {vlm_path / 'config.json'}: {e}") from e
    try:
        tok = AutoTokenizer.from_pretrained(str(vlm_path), local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(
            f"cannot load the tokenizer from {vlm_path} (needs tokenizer.json / tokenizer_config.json): {e}. "
            "Supply a directory with the VLM's tokenizer files via --vlm-dir DIR") from e
    return cfg, tok


# ------------------------------------------------------------------------------------------- reading
def _refuse_pickle(d: Path) -> None:
    bad = sorted(p.name for p in d.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if bad and not (d / "model.safetensors").is_file():
        raise CheckpointError(f"{d}: only pickle weight files ({', '.join(bad)}) found; pickle is refused for "
                              "safety. Convert the weights to model.safetensors.")


def read_safetensors(path: Path) -> dict[str, Tensor]:
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: only .safetensors files are read (pickle is refused)")
    if not path.is_file():
        raise CheckpointError(f"missing file {path}")
    out = {}
    with safe_open(str(path), framework="pt") as f:
        for k in f.keys():  # noqa: SIM118 - safe_open has no __iter__
            out[k] = f.get_tensor(k)
    return out


def _processor_step(d: Path, json_name: str, registry: str) -> tuple[dict[str, Any], Path | None] | None:
    p = d / json_name
    if not p.is_file():
        return None
    spec = json.loads(p.read_text())
    for step in spec.get("steps", []):
        if step.get("registry_name") == registry:
            sf = step.get("state_file")
            return step.get("config", {}), (d / sf if sf else None)
    return {}, None


def load_normalizer(d: Path, weights: dict[str, Tensor], cfg: dict[str, Any]) -> tuple[Normalizer, dict[str, Any]]:
    """Statistics from the processor files, else from legacy ``*.buffer_*`` keys in model.safetensors.

    Returns the normalizer and the tokenizer step's config (empty when absent)."""
    norm_map = dict(cfg.get("normalization_mapping") or {"VISUAL": "IDENTITY", "STATE": "MEAN_STD",
                                                          "ACTION": "MEAN_STD"})
    stats: dict[str, dict[str, Tensor]] = {}
    eps = 1e-8
    for json_name, registry in (("policy_preprocessor.json", "normalizer_processor"),
                                ("policy_postprocessor.json", "unnormalizer_processor")):
        step = _processor_step(d, json_name, registry)
        if step is None:
            continue
        conf, state_file = step
        eps = float(conf.get("eps", eps))
        norm_map.update(conf.get("norm_map") or {})
        if state_file is not None:
            for key, st in Normalizer.unflat(read_safetensors(state_file)).items():
                stats.setdefault(key, {}).update(st)
    if not stats:  # legacy layout inside model.safetensors
        feats = list(cfg.get("input_features", {})) + list(cfg.get("output_features", {}))
        by_flat = {k.replace(".", "_"): k for k in feats}
        for name, t in weights.items():
            for prefix in ("normalize_inputs.buffer_", "normalize_targets.buffer_", "unnormalize_outputs.buffer_"):
                if name.startswith(prefix):
                    flat, stat = name[len(prefix):].rsplit(".", 1)
                    key = by_flat.get(flat, flat)
                    if torch.isfinite(t).all():
                        stats.setdefault(key, {})[stat] = t
    tok_step = _processor_step(d, "policy_preprocessor.json", "tokenizer_processor")
    tok_conf = tok_step[0] if tok_step else {}
    return Normalizer(stats=stats, norm_map=norm_map, eps=eps), tok_conf


def _arch_from_weights(arch: SmolVLAArch, sd: dict[str, Tensor]) -> SmolVLAArch:
    """Shapes the weights determine override the configs."""
    text = PREFIX + "vlm_with_expert.vlm.model.text_model."
    n_layers = len({k[len(text + "layers."):].split(".")[0] for k in sd if k.startswith(text + "layers.")})
    exp = PREFIX + "vlm_with_expert.lm_expert."
    n_exp = len({k[len(exp + "layers."):].split(".")[0] for k in sd if k.startswith(exp + "layers.")})
    changes: dict[str, Any] = {}
    if n_layers:
        changes["num_vlm_layers"] = n_layers
        if n_exp and n_exp != n_layers:
            changes["num_expert_layers"] = n_exp
    if text + "embed_tokens.weight" in sd:
        changes["vocab_size"] = sd[text + "embed_tokens.weight"].shape[0]
    if PREFIX + "action_in_proj.weight" in sd:
        w = sd[PREFIX + "action_in_proj.weight"]
        changes["max_action_dim"] = w.shape[1]
        changes["expert_width_multiplier"] = w.shape[0] / arch.text_hidden_size
    if PREFIX + "state_proj.weight" in sd:
        changes["max_state_dim"] = sd[PREFIX + "state_proj.weight"].shape[1]
    new = arch.replace(**changes)
    if new.expert_hidden_size != sd.get(PREFIX + "action_in_proj.weight", torch.empty(new.expert_hidden_size)).shape[0]:
        raise CheckpointError("expert width in the weights is not a width SmolVLA can build")
    return new


def _checkpoint_files(checkpoint_dir: str | os.PathLike[str]) -> tuple[Path, dict[str, Any], Path]:
    """The directory, its config.json and its model.safetensors path, checked (CheckpointError names the file)."""
    d = Path(checkpoint_dir)
    if not d.is_dir():
        raise CheckpointError(f"checkpoint directory {d} does not exist")
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{d} has no config.json: not a LeRobot policy checkpoint")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("type", "smolvla") != "smolvla":
        raise CheckpointError(f"{cfg_path}: policy type {cfg.get('type')!r} is not 'smolvla'")
    _refuse_pickle(d)
    model_path = d / "model.safetensors"
    if not model_path.is_file():
        raise CheckpointError(f"{d} has no model.safetensors (the policy weights)")
    return d, cfg, model_path


def read_arch(checkpoint_dir: str | os.PathLike[str], *, vlm_dir: str | os.PathLike[str] | None = None) -> SmolVLAArch:
    """The architecture :func:`load_policy` would build, without reading a weight: the shapes come from the
    safetensors header (a node that needs only the shapes, such as a chunk_corrector reading the compressor's tokens,
    does not hold the model)."""
    d, cfg, model_path = _checkpoint_files(checkpoint_dir)
    with safe_open(str(model_path), framework="pt") as f:
        shapes = {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}  # noqa: SIM118
    vlm_cfg, _ = load_vlm_files(resolve_vlm_dir(cfg.get("vlm_model_name", SmolVLAArch.vlm_model_name),
                                                vlm_dir=vlm_dir, checkpoint_dir=d))
    return _arch_from_weights(SmolVLAArch.from_vlm_config(vlm_cfg, **SmolVLAArch.policy_fields_from_lerobot(cfg)),
                              shapes)


def load_policy(checkpoint_dir: str | os.PathLike[str], *, vlm_dir: str | os.PathLike[str] | None = None,
                runtime: RuntimeConfig | None = None, strict: bool = True) -> SmolVLAPolicy:
    """Load a LeRobot SmolVLA checkpoint directory (safetensors only) into a :class:`SmolVLAPolicy`.

    ``runtime=None`` runs it as LeRobot does: with ``load_vlm_weights=true`` in config.json (pretrained
    VLM, e.g. lerobot/smolvla_base and its fine-tunes) the VLM is bf16 and the expert fp32, else fp32.
    """
    d, cfg, model_path = _checkpoint_files(checkpoint_dir)
    sd = read_safetensors(model_path)

    vlm_name = cfg.get("vlm_model_name", SmolVLAArch.vlm_model_name)
    vlm_path = resolve_vlm_dir(vlm_name, vlm_dir=vlm_dir, checkpoint_dir=d)
    vlm_cfg, tokenizer = load_vlm_files(vlm_path)
    arch = SmolVLAArch.from_vlm_config(vlm_cfg, **SmolVLAArch.policy_fields_from_lerobot(cfg))
    arch = _arch_from_weights(arch, sd)
    normalizer, tok_conf = load_normalizer(d, sd, cfg)
    tok_opts: dict[str, Any] = {k: tok_conf[k] for k in ("max_length", "padding", "padding_side", "truncation") if k in tok_conf}

    weights = build_weights(arch, vlm_cfg, meta=True)
    model_sd = {k: v for k, v in sd.items() if not k.startswith(("normalize_", "unnormalize_"))}
    expected = set(weights.state_dict())
    missing = sorted(expected - set(model_sd))
    unexpected = sorted(set(model_sd) - expected)
    if missing or (strict and unexpected):
        raise CheckpointError(f"{model_path}: parameters do not match SmolVLA built from {vlm_path}: "
                              f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                              f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    weights.load_state_dict({k: model_sd[k] for k in expected}, assign=True, strict=True)
    leftovers = [n for n, t in list(weights.named_parameters()) + list(weights.named_buffers()) if t.is_meta]
    if leftovers:
        raise CheckpointError(f"tensors left uninitialised after loading: {leftovers[:5]}")
    policy = SmolVLAPolicy(weights, arch, tokenizer=tokenizer, normalizer=normalizer,
                           runtime=runtime or default_runtime(cfg), vlm_config=vlm_cfg, tokenizer_options=tok_opts)
    policy.vlm_dir = vlm_path
    policy.source = d
    return policy


def default_runtime(cfg: dict[str, Any], **changes: Any) -> RuntimeConfig:
    """LeRobot's dtypes for a checkpoint config: bf16 VLM + fp32 expert when load_vlm_weights, else fp32."""
    if cfg.get("load_vlm_weights"):
        return RuntimeConfig.lerobot_bf16(**changes)
    return RuntimeConfig(**changes)


# ------------------------------------------------------------------------------------------- building
def build_random_policy(arch: SmolVLAArch, *, tokenizer: Any = None, vlm_config: Any = None, seed: int = 0,
                        init: str = "fan_in", runtime: RuntimeConfig | None = None,
                        stats: dict[str, dict[str, Tensor]] | None = None) -> SmolVLAPolicy:
    """A policy with random weights. ``init='fan_in'``: O(1)-scale weights (every component matters),
    ``'transformers'``: the transformers initialisation. ``stats``: normalization statistics
    (feature -> {"mean", "std", ...}); without them state/action pass through unnormalized."""
    torch.manual_seed(seed)
    weights = build_weights(arch, vlm_config)
    randomize_(weights, seed=seed + 1, scale=init)
    normalizer = Normalizer(stats=dict(stats or {}), norm_map=dict(arch.normalization_mapping))
    return SmolVLAPolicy(weights, arch, tokenizer=tokenizer, normalizer=normalizer,
                         runtime=runtime or RuntimeConfig(), vlm_config=vlm_config or arch.vlm_config())


def _processor_jsons(arch: SmolVLAArch, tokenizer_name: str, eps: float = 1e-8) -> tuple[dict[str, Any], dict[str, Any]]:
    feats: dict[str, Any] = {"observation.state": {"type": "STATE", "shape": [arch.state_dim]}}
    for k in arch.image_keys:
        feats[k] = {"type": "VISUAL", "shape": list(arch.camera_shape)}
    feats["action"] = {"type": "ACTION", "shape": [arch.action_dim]}
    norm_map = dict(arch.normalization_mapping)
    pre = {"name": "policy_preprocessor", "steps": [
        {"registry_name": "rename_observations_processor", "config": {"rename_map": {}}},
        {"registry_name": "to_batch_processor", "config": {}},
        {"registry_name": "smolvla_new_line_processor", "config": {}},
        {"registry_name": "tokenizer_processor", "config": {
            "max_length": arch.tokenizer_max_length, "task_key": "task", "padding_side": "right",
            "padding": arch.pad_language_to, "truncation": True, "tokenizer_name": tokenizer_name}},
        {"registry_name": "device_processor", "config": {"device": "cpu", "float_dtype": None}},
        {"registry_name": "normalizer_processor", "config": {"eps": eps, "features": feats, "norm_map": norm_map},
         "state_file": "policy_preprocessor_step_5_normalizer_processor.safetensors"},
    ]}
    post = {"name": "policy_postprocessor", "steps": [
        {"registry_name": "unnormalizer_processor",
         "config": {"eps": eps, "features": {"action": feats["action"]}, "norm_map": norm_map},
         "state_file": "policy_postprocessor_step_0_unnormalizer_processor.safetensors"},
        {"registry_name": "device_processor", "config": {"device": "cpu", "float_dtype": None}},
    ]}
    return pre, post


def save_policy(policy: SmolVLAPolicy, out_dir: str | os.PathLike[str], *, vlm_model_name: str | None = None,
                include_vlm_files: bool = True, dtype: torch.dtype | None = None) -> Path:
    """Write a LeRobot-layout checkpoint: config.json, model.safetensors (LeRobot parameter names),
    policy_pre/postprocessor.json + normalizer statistics, and (``include_vlm_files``) the VLM config +
    tokenizer under ``vlm/`` so that the directory is self-contained offline.

    ``vlm_model_name`` recorded in config.json defaults to ``policy.arch.vlm_model_name``."""
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    arch = policy.arch
    name = vlm_model_name or arch.vlm_model_name
    cfg = arch.replace(vlm_model_name=name).to_lerobot_config()
    (d / "config.json").write_text(json.dumps(cfg, indent=4))
    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
          for k, v in policy.weights.state_dict().items()}
    save_file(sd, str(d / "model.safetensors"))
    pre, post = _processor_jsons(arch, name, policy.normalizer.eps)
    (d / "policy_preprocessor.json").write_text(json.dumps(pre, indent=2))
    (d / "policy_postprocessor.json").write_text(json.dumps(post, indent=2))
    flat = policy.normalizer.flat()
    save_file(flat, str(d / "policy_preprocessor_step_5_normalizer_processor.safetensors"))
    save_file(flat, str(d / "policy_postprocessor_step_0_unnormalizer_processor.safetensors"))
    if include_vlm_files:
        vdir = d / "vlm"
        src = getattr(policy, "vlm_dir", None)
        if src is not None and Path(src).resolve() != vdir.resolve():
            vdir.mkdir(exist_ok=True)
            for f in VLM_FILES:
                if (Path(src) / f).is_file():
                    shutil.copy2(Path(src) / f, vdir / f)
        elif src is None:
            vdir.mkdir(exist_ok=True)
            (policy.vlm_config or arch.vlm_config()).save_pretrained(str(vdir))
            if policy.tokenizer is not None:
                policy.tokenizer.save_pretrained(str(vdir))
    return d
