"""Replay settings: the baseline (every optimization off), ``--sweep`` values and ``--target`` files.

A setting is a full set of the efficiency configs of the pipeline, named by the same dotted names as
the nodes' ROS parameters::

    pruning.*       (PruningConfig, token_compressor)     reuse.*        (ReuseConfig, token_compressor)
    early_exit.*    (EarlyExitConfig, policy)             expert_reuse.* (ExpertReuseConfig, policy)
    rtc.*           (RTCConfig, policy)                   num_steps      (InferenceConfig, policy)

Baseline: ``pruning.method=none``, ``reuse.enabled=false``, ``early_exit.enabled=false``,
``expert_reuse.enabled=false``, ``rtc.enabled=false``, ``num_steps`` = the checkpoint's.

``--sweep name=v1,v2`` gives one setting per value, each applied alone on the baseline
("one-at-a-time", default) or, with ``product``, every combination across the swept names. List
parameters take ``:``-separated elements (``early_exit.thresholds=0.99:0.995``).

Implied switches: a value for a group whose switch is off in the baseline turns that switch on,
unless the setting sets the switch itself (``pruning.keep_ratio=0.25`` implies
``pruning.method=task``; ``reuse.threshold=...`` implies ``reuse.enabled=true``; likewise
``early_exit``, ``expert_reuse``, ``rtc``). The report lists what was implied.
"""
from __future__ import annotations

import dataclasses
import itertools
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from effvla_ros.core.compression.compressor import ReuseConfig
from effvla_ros.core.compression.pruning import PruningConfig
from effvla_ros.core.early_exit import EarlyExitConfig, ExpertReuseConfig
from effvla_ros.core.params import ConfigBase
from effvla_ros.core.rtc import RTCConfig
from effvla_ros.core.runner import InferenceConfig

GROUPS: dict[str, type[ConfigBase]] = {
    "pruning": PruningConfig,
    "reuse": ReuseConfig,
    "early_exit": EarlyExitConfig,
    "expert_reuse": ExpertReuseConfig,
    "rtc": RTCConfig,
}
# switch of each group: (field, value that turns the group on)
SWITCHES: dict[str, tuple[str, Any]] = {
    "pruning": ("method", "task"),
    "reuse": ("enabled", True),
    "early_exit": ("enabled", True),
    "expert_reuse": ("enabled", True),
    "rtc": ("enabled", True),
}
BASELINE_OFF: dict[str, Any] = {
    "pruning.method": "none",
    "reuse.enabled": False,
    "early_exit.enabled": False,
    "expert_reuse.enabled": False,
    "rtc.enabled": False,
}


@dataclass
class Setting:
    name: str
    overrides: dict[str, Any]  # dotted name -> value, as given (after implied switches)
    pruning: PruningConfig
    reuse: ReuseConfig
    early_exit: EarlyExitConfig
    expert_reuse: ExpertReuseConfig
    rtc: RTCConfig
    inference: InferenceConfig
    implied: list[str] = field(default_factory=list)

    @property
    def is_baseline(self) -> bool:
        return not self.overrides

    def config_dict(self) -> dict[str, Any]:
        return {"pruning": self.pruning.to_dict(), "reuse": self.reuse.to_dict(),
                "early_exit": self.early_exit.to_dict(), "expert_reuse": self.expert_reuse.to_dict(),
                "rtc": self.rtc.to_dict(), "num_steps": self.inference.num_steps}


def _field_type(cls: type[ConfigBase], name: str, full: str | None = None) -> Any:
    hints = typing.get_type_hints(cls)
    if name not in hints:
        known = ", ".join(f.name for f in dataclasses.fields(cls))
        raise ValueError(f"{full or name}: unknown parameter of {cls.__name__} (known: {known})")
    return hints[name]


def parse_value(tp: Any, text: str, name: str) -> Any:
    """A command-line string as the field's type (bool, int, float, str, or a ':'-separated list)."""
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        (elem,) = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return [parse_value(elem, x, name) for x in text.split(":") if x != ""]
    t = text.strip()
    try:
        if tp is bool:
            low = t.lower()
            if low in ("true", "1", "on", "yes"):
                return True
            if low in ("false", "0", "off", "no"):
                return False
            raise ValueError
        if tp is int:
            return int(t)
        if tp is float:
            return float(t)
    except ValueError:
        raise ValueError(f"{name}: {text!r} is not a valid {tp.__name__}") from None
    return t


def split_name(name: str) -> tuple[str, str]:
    """``pruning.keep_ratio`` -> ("pruning", "keep_ratio"); ``num_steps`` -> ("inference", "num_steps")."""
    if name == "num_steps":
        return "inference", "num_steps"
    group, _, fld = name.partition(".")
    if group not in GROUPS or not fld:
        raise ValueError(f"{name}: unknown setting; use <group>.<parameter> with group in {sorted(GROUPS)} "
                         "or num_steps (the nodes' ROS parameter names)")
    return group, fld


def typed(name: str, value: Any) -> Any:
    group, fld = split_name(name)
    cls = InferenceConfig if group == "inference" else GROUPS[group]
    tp = _field_type(cls, fld, name)
    return parse_value(tp, value, name) if isinstance(value, str) else value


def parse_sweep(items: Sequence[str]) -> list[tuple[str, list[Any]]]:
    """``["pruning.keep_ratio=0.25,0.5", ...]`` -> [(name, [typed values])]."""
    out: list[tuple[str, list[Any]]] = []
    for item in items:
        name, eq, values = item.partition("=")
        name = name.strip()
        if not eq or not values.strip():
            raise ValueError(f"--sweep {item!r}: expected name=v1,v2,... (e.g. pruning.keep_ratio=0.25,0.5)")
        vals = [typed(name, v) for v in values.split(",") if v.strip() != ""]
        out.append((name, vals))
    return out


def make_setting(name: str, overrides: Mapping[str, Any], num_steps: int) -> Setting:
    """Baseline + ``overrides`` (dotted names, typed or string values), validated by the configs."""
    typed_over = {k: typed(k, v) for k, v in overrides.items()}
    implied: list[str] = []
    values: dict[str, Any] = dict(BASELINE_OFF)
    values["num_steps"] = num_steps
    for k in list(typed_over):
        group, fld = split_name(k)
        if group in SWITCHES:
            sw, on = SWITCHES[group]
            swname = f"{group}.{sw}"
            if fld != sw and swname not in typed_over and values.get(swname) != on:
                values[swname] = on
                implied.append(f"{swname}={_fmt(on)}")
    values.update(typed_over)
    groups: dict[str, dict[str, Any]] = {g: {} for g in [*GROUPS, "inference"]}
    for k, v in values.items():
        g, f = split_name(k)
        groups[g][f] = v
    try:
        cfgs = {g: (GROUPS[g] if g in GROUPS else InferenceConfig)(**groups[g]) for g in groups}
    except TypeError as e:
        raise ValueError(f"setting {name}: {e}") from None
    all_over = {**typed_over, **{s.split("=")[0]: values[s.split("=")[0]] for s in implied}}
    return Setting(name, all_over, cfgs["pruning"], cfgs["reuse"], cfgs["early_exit"],  # type: ignore[arg-type]
                   cfgs["expert_reuse"], cfgs["rtc"], cfgs["inference"], implied)  # type: ignore[arg-type]


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return ":".join(_fmt(x) for x in v)
    return str(v)


def build_settings(sweeps: Sequence[tuple[str, list[Any]]], num_steps: int, *, mode: str = "one-at-a-time",
                   extra: Sequence[tuple[str, Mapping[str, Any]]] = ()) -> list[Setting]:
    """Baseline first, then the sweep settings, then ``extra`` named settings (e.g. a target's)."""
    settings = [make_setting("baseline", {}, num_steps)]
    if mode not in ("one-at-a-time", "product"):
        raise ValueError(f"sweep mode: {mode!r} is not one of one-at-a-time, product")
    combos: list[dict[str, Any]] = []
    if mode == "product" and sweeps:
        names = [n for n, _ in sweeps]
        for combo in itertools.product(*[v for _, v in sweeps]):
            combos.append(dict(zip(names, combo)))
    else:
        for n, values in sweeps:
            for v in values:
                combos.append({n: v})
    seen = {"baseline"}
    for over in combos:
        name = ",".join(f"{k}={_fmt(v)}" for k, v in over.items())
        if name in seen:
            continue
        seen.add(name)
        settings.append(make_setting(name, over, num_steps))
    for extra_name, extra_over in extra:
        settings.append(make_setting(extra_name, extra_over, num_steps))
    return settings


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
            group, fld = split_name(k)
            cls = InferenceConfig if group == "inference" else GROUPS[group]
            _field_type(cls, fld)
        except ValueError:
            continue
        clean[k] = v
    return clean, pol, execp
