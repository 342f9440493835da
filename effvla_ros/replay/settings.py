"""Replay settings: the grammar of ``--sweep`` (shared with ``effvla eval-sim``) and ``--target`` files.

The settings and their grammar live in :mod:`effvla_ros.core.settings` (one module for ``effvla replay``
and ``effvla eval-sim``; list values are ``:``-separated, ``+`` joins changes of one setting); they are
re-exported here. Replay rejects the ``exec.*`` names (eval-sim's execution; replay's RTC delay is
``--rtc-delay-steps``) and ``inference.count_flops`` (replay counts FLOPs per ``--flops``).

This module adds the deployment targets: :func:`target_overrides` reads a target's layered parameter
files (``config/base.yaml`` < ``config/targets/<target>.yaml``) into a setting and the policy's and chunk
executor's node parameters.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from effvla_ros.core.settings import (
    ALIASES,
    BASELINE_OFF,
    GROUPS,
    LIST_SEPARATOR,
    SWITCHES,
    Setting,
    SweepItem,
    build_settings,
    canonical,
    format_value,
    make_setting,
    parse_item,
    parse_sweep,
    parse_value,
    typed,
)

#: Names replay does not take in a sweep -> why.
REPLAY_UNSUPPORTED: dict[str, str] = {
    "exec": "eval-sim only (replay executes every chunk; its RTC delay is --rtc-delay-steps)",
    "inference.count_flops": "replay counts FLOPs per --flops, not per setting",
    "correction": "eval-sim only (the correction runs at every control step, from the measured joint positions)",
}


def parse_replay_sweep(items: Sequence[str]) -> list[SweepItem]:
    """:func:`~effvla_ros.core.settings.parse_sweep` with replay's unsupported names rejected."""
    return parse_sweep(items, unsupported=REPLAY_UNSUPPORTED)


# ------------------------------------------------------------------------------------------ targets
def _deep_merge(dst: dict[str, Any], src: Mapping[str, Any]) -> None:
    for k, v in src.items():
        if isinstance(v, Mapping) and isinstance(dst.get(k), dict):
            _deep_merge(dst[k], v)
        else:
            dst[k] = dict(v) if isinstance(v, Mapping) else v


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def node_params(files: Sequence[Path], node: str) -> dict[str, Any]:
    """Flattened ROS parameters of ``node`` from layered parameter files (later files win)."""
    import yaml

    merged: dict[str, Any] = {}
    for f in files:
        data = yaml.safe_load(Path(f).read_text()) or {}
        for key, section in data.items():
            name = str(key).rstrip("/").split("/")[-1]
            if name in ("**", node) and isinstance(section, Mapping):
                _deep_merge(merged, section.get("ros__parameters", {}) or {})
    return _flatten(merged)


def target_files(target: str, root: Path | None = None) -> list[Path]:
    from effvla_ros.graph import params_files

    return params_files(target, None, root)


def target_overrides(target: str, root: Path | None = None) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(efficiency settings, policy node params, chunk_executor params) of a deployment target."""
    files = target_files(target, root)
    comp = node_params(files, "token_compressor")
    pol = node_params(files, "policy")
    execp = node_params(files, "chunk_executor")
    over: dict[str, Any] = {}
    for k, v in comp.items():
        if k.split(".")[0] in ("pruning", "reuse"):
            over[k] = v
    for k, v in pol.items():
        if k.split(".")[0] in ("early_exit", "expert_reuse", "rtc") or k == "num_steps":
            over[k] = v
    # keep only names the configs know (files may carry more than the configs do)
    clean: dict[str, Any] = {}
    for k, v in over.items():
        try:
            typed(k, v)
        except ValueError:
            continue
        clean[k] = v
    return clean, pol, execp


__all__ = [
    "ALIASES", "BASELINE_OFF", "GROUPS", "LIST_SEPARATOR", "REPLAY_UNSUPPORTED", "SWITCHES", "Setting", "SweepItem",
    "build_settings", "canonical", "format_value", "make_setting", "node_params", "parse_item", "parse_replay_sweep",
    "parse_sweep", "parse_value", "target_files", "target_overrides", "typed",
]
