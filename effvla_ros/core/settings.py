"""Efficiency settings and the one ``--sweep`` grammar of ``effvla replay`` and ``effvla eval-sim`` (ROS-free).

A *setting* is a full set of the pipeline's efficiency configs, named by the nodes' ROS parameter
names, on top of the *baseline* - every optimization off (``pruning.method=none``,
``reuse.enabled=false``, ``early_exit.enabled=false``, ``expert_reuse.enabled=false``,
``rtc.enabled=false``) - and the run's defaults (e.g. the denoising steps)::

    pruning.*       PruningConfig (token_compressor)   reuse.*         ReuseConfig (token_compressor)
    early_exit.*    EarlyExitConfig (policy)           expert_reuse.*  ExpertReuseConfig (policy)
    rtc.*           RTCConfig (policy)                 inference.*     InferenceConfig (policy: num_steps, count_flops)
    exec.*          ExecConfig (eval-sim only: horizon, delay_steps)
    correction.*    CorrectionConfig (per control step: eval-sim; A2C2, core/correction.py)

Short names: ``num_steps``, ``count_flops`` (``inference.``), ``horizon``, ``delay_steps`` (``exec.``).

Grammar of one ``--sweep`` item::

    ITEM  := NAME=VALUE[,VALUE...]          one setting per value, each on the baseline
           | NAME=VALUE[+NAME=VALUE...]     one setting with all these changes
    VALUE := true|false (also on/off, yes/no, 1/0) | a number | text
           | ITEM[:ITEM...]                 list parameters (early_exit.thresholds=0.99:0.995)

The list separator is ``:`` (``;``, eval-sim's former one, is still read). Examples:
``pruning.keep_ratio=0.25,0.5``, ``"pruning.keep_ratio=0.5+reuse.enabled=true"``,
``early_exit.thresholds=0.9:0.95``. Mode ``one-at-a-time`` (default): every item's settings one after
the other; ``product``: every combination of one setting of each item (changes merged). A setting is
named by its text (``pruning.keep_ratio=0.25``, ``rtc.enabled=true+delay_steps=2``; product: the parts
joined with ``+``); settings of the same name are run once.

Implied switches: changing a field of a group whose switch is off turns the switch on, unless the
setting sets the switch itself (``pruning.keep_ratio=0.25`` implies ``pruning.method=task``;
``reuse.threshold=...`` implies ``reuse.enabled=true``; likewise ``early_exit``, ``expert_reuse``,
``rtc``, ``correction``). :attr:`Setting.implied` lists what was implied.
"""
from __future__ import annotations

import dataclasses
import itertools
import re
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from effvla_ros.core.compression.compressor import ReuseConfig
from effvla_ros.core.compression.pruning import PruningConfig
from effvla_ros.core.correction import CorrectionConfig
from effvla_ros.core.early_exit import EarlyExitConfig, ExpertReuseConfig
from effvla_ros.core.params import ConfigBase, param
from effvla_ros.core.rtc import RTCConfig
from effvla_ros.core.runner import InferenceConfig

LIST_SEPARATOR = ":"
_LIST_SPLIT = re.compile(r"[:;]")  # ';': eval-sim's former separator, still read
_JOIN_SPLIT = re.compile(r"\+(?=\s*[A-Za-z_][\w.]*\s*=)")  # '+' before NAME= (so 1e+3 stays a number)


@dataclass
class ExecConfig(ConfigBase):
    """How eval-sim executes chunks (not a node parameter; replay has ``--rtc-delay-steps``)."""

    horizon: int = param(0, min=0, max=10000, description="actions executed per chunk (0: the checkpoint's "
                                                           "n_action_steps)")
    delay_steps: int = param(0, min=0, max=10000, description="emulated inference delay in control steps")
    correction_lag: int = param(0, min=0, max=10000,
                                description="correction.*: the observation a step's correction sees is this many "
                                            "control steps old (the graph commits a step before it runs)")
    correction_tokens: str = param("fresh", choices=("fresh", "compressor"),
                                   description="correction.*: the head's frame tokens: fresh (a full encode of each "
                                               "frame) or compressor (the token compressor runs on every frame and "
                                               "its tokens before pruning are used: the chunk_corrector's "
                                               "visual_source compressor)")


GROUPS: dict[str, type[ConfigBase]] = {
    "pruning": PruningConfig,
    "reuse": ReuseConfig,
    "early_exit": EarlyExitConfig,
    "expert_reuse": ExpertReuseConfig,
    "rtc": RTCConfig,
    "inference": InferenceConfig,
    "exec": ExecConfig,
    "correction": CorrectionConfig,
}
ALIASES: dict[str, str] = {"num_steps": "inference.num_steps", "count_flops": "inference.count_flops",
                           "horizon": "exec.horizon", "delay_steps": "exec.delay_steps",
                           "correction_lag": "exec.correction_lag", "correction_tokens": "exec.correction_tokens"}
# switch of each group: (field, value that turns the group on)
SWITCHES: dict[str, tuple[str, Any]] = {
    "pruning": ("method", "task"),
    "reuse": ("enabled", True),
    "early_exit": ("enabled", True),
    "expert_reuse": ("enabled", True),
    "rtc": ("enabled", True),
    "correction": ("enabled", True),
}
BASELINE_OFF: dict[str, Any] = {
    "pruning.method": "none",
    "reuse.enabled": False,
    "early_exit.enabled": False,
    "expert_reuse.enabled": False,
    "rtc.enabled": False,
    "correction.enabled": False,
}

Changes = dict[str, Any]  # canonical name (group.field) -> typed value
SweepItem = list[tuple[str, Changes]]  # the settings of one --sweep item: (name, changes)


@dataclass
class Setting:
    """One configuration of the pipeline: the baseline, the run's defaults, then ``overrides``."""

    name: str
    overrides: Changes  # canonical name -> typed value: the changes as given and the switches they imply
    pruning: PruningConfig
    reuse: ReuseConfig
    early_exit: EarlyExitConfig
    expert_reuse: ExpertReuseConfig
    rtc: RTCConfig
    inference: InferenceConfig
    execution: ExecConfig
    implied: list[str] = field(default_factory=list)  # "group.switch=value" turned on by the changes
    correction: CorrectionConfig = field(default_factory=CorrectionConfig)  # per-step correction (eval-sim only so far)

    @property
    def is_baseline(self) -> bool:
        return not self.overrides

    def configs(self) -> dict[str, Any]:
        """The configs by group name (``pruning``, ..., ``inference``, ``exec``)."""
        return {"pruning": self.pruning, "reuse": self.reuse, "early_exit": self.early_exit,
                "expert_reuse": self.expert_reuse, "rtc": self.rtc, "inference": self.inference,
                "exec": self.execution, "correction": self.correction}

    def config_dict(self) -> dict[str, Any]:
        """The policy-side configs as plain values (replay's report)."""
        return {"pruning": self.pruning.to_dict(), "reuse": self.reuse.to_dict(),
                "early_exit": self.early_exit.to_dict(), "expert_reuse": self.expert_reuse.to_dict(),
                "rtc": self.rtc.to_dict(), "num_steps": self.inference.num_steps}

    def effective_changes(self) -> Changes:
        """The baseline's switches with the overrides applied (eval-sim's report)."""
        return {**BASELINE_OFF, **self.overrides}

    def exec_params(self) -> tuple[int, int]:
        """(execution horizon, emulated delay steps) of eval-sim."""
        return self.execution.horizon, self.execution.delay_steps


# ------------------------------------------------------------------------------------------ names, values
def canonical(name: str) -> str:
    """``num_steps`` -> ``inference.num_steps``; ``pruning.keep_ratio`` stays; unknown groups raise."""
    key = ALIASES.get(name.strip(), name.strip())
    group, _, fld = key.partition(".")
    if group not in GROUPS or not fld:
        raise ValueError(f"{name.strip()}: unknown setting; use <group>.<parameter> with group one of "
                         f"{sorted(GROUPS)}, or {', '.join(sorted(ALIASES))}")
    return key


def _field_type(name: str) -> Any:
    group, _, fld = canonical(name).partition(".")
    cls = GROUPS[group]
    hints = typing.get_type_hints(cls)
    if fld not in hints or fld not in {f.name for f in dataclasses.fields(cls)}:
        known = ", ".join(f.name for f in dataclasses.fields(cls))
        raise ValueError(f"{name.strip()}: unknown parameter of {cls.__name__} (known: {known})")
    return hints[fld]


def parse_value(tp: Any, text: str, name: str) -> Any:
    """A command-line string as a field of type ``tp``: bool, int, float, str, or a list of them
    (items separated by ``:``)."""
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        (elem,) = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return [parse_value(elem, x, name) for x in _LIST_SPLIT.split(text) if x.strip() != ""]
    t = text.strip()
    if tp is bool:
        low = t.lower()
        if low in ("true", "1", "on", "yes"):
            return True
        if low in ("false", "0", "off", "no"):
            return False
        raise ValueError(f"{name}: {text!r} is not a boolean (true/false)")
    try:
        if tp is int:
            return int(t)
        if tp is float:
            return float(t)
    except ValueError:
        raise ValueError(f"{name}: {text!r} is not a valid {tp.__name__}") from None
    return t


def typed(name: str, value: Any) -> Any:
    """``value`` as the type of the field ``name`` (strings are parsed; typed values are kept)."""
    tp = _field_type(name)
    return parse_value(tp, value, name.strip()) if isinstance(value, str) else value


# ------------------------------------------------------------------------------------------ grammar
def parse_item(item: str) -> SweepItem:
    """One ``--sweep`` item -> its settings as (name, changes), see the module docstring."""
    text = item.strip()
    parts = _JOIN_SPLIT.split(text)
    if len(parts) > 1:
        changes: Changes = {}
        names = []
        for part in parts:
            name, eq, value = part.partition("=")
            if not eq or not name.strip() or not value.strip():
                raise ValueError(f"--sweep {item!r}: expected NAME=VALUE+NAME=VALUE (one value each)")
            if "," in value:
                raise ValueError(f"--sweep {item!r}: one value per name in a '+' item (lists: a:b:c)")
            changes[canonical(name)] = typed(name, value)
            names.append(f"{name.strip()}={value.strip()}")
        return [("+".join(names), changes)]
    name, eq, values = text.partition("=")
    if not eq or not name.strip() or not values.strip():
        raise ValueError(f"--sweep {item!r}: expected NAME=V1,V2,... (e.g. pruning.keep_ratio=0.25,0.5)")
    out: SweepItem = []
    for v in values.split(","):
        if v.strip() == "":
            continue
        out.append((f"{name.strip()}={v.strip()}", {canonical(name): typed(name, v)}))
    return out


def parse_sweep(items: Sequence[str], *, unsupported: Mapping[str, str] | None = None) -> list[SweepItem]:
    """Every ``--sweep`` item parsed and typed (:func:`parse_item`). ``unsupported``: canonical names or
    groups this command rejects -> why (e.g. replay: ``exec``)."""
    out = [parse_item(i) for i in items]
    for sweep_item in out:
        for _, changes in sweep_item:
            _check_supported(changes, unsupported or {})
    return out


def _check_supported(changes: Mapping[str, Any], unsupported: Mapping[str, str]) -> None:
    for key in changes:
        for what in (key, key.partition(".")[0]):
            if what in unsupported:
                raise ValueError(f"{key}: {unsupported[what]}")


def implied_switches(changes: Mapping[str, Any]) -> Changes:
    """The switches ``changes`` (canonical names) imply: a field of a group turns that group's switch on unless the
    changes set the switch themselves (``pruning.keep_ratio`` implies ``pruning.method=task``)."""
    out: Changes = {}
    for key in changes:
        group, _, fld = key.partition(".")
        if group in SWITCHES:
            sw, on = SWITCHES[group]
            if fld != sw and f"{group}.{sw}" not in changes:
                out[f"{group}.{sw}"] = on
    return out


def make_setting(name: str, overrides: Mapping[str, Any], defaults: Mapping[str, Any] | None = None) -> Setting:
    """Baseline + ``defaults`` (the run's, e.g. ``{"num_steps": 10}``; they imply nothing) + ``overrides``
    (names as in the grammar, typed or string values), validated by the configs (``ValueError``)."""
    base = {canonical(k): typed(k, v) for k, v in (defaults or {}).items()}
    changes = {canonical(k): typed(k, v) for k, v in overrides.items()}
    values: Changes = {**BASELINE_OFF, **base}
    implied_values = {k: v for k, v in implied_switches(changes).items() if values.get(k) != v}
    implied = [f"{k}={format_value(v)}" for k, v in implied_values.items()]
    values.update(implied_values)
    values.update(changes)
    fields: dict[str, dict[str, Any]] = {g: {} for g in GROUPS}
    for key, v in values.items():
        group, _, fld = key.partition(".")
        fields[group][fld] = v
    try:
        cfgs = {g: cls(**fields[g]) for g, cls in GROUPS.items()}
    except TypeError as e:
        raise ValueError(f"setting {name}: {e}") from None
    return Setting(name, {**changes, **implied_values}, cfgs["pruning"], cfgs["reuse"],  # type: ignore[arg-type]
                   cfgs["early_exit"], cfgs["expert_reuse"], cfgs["rtc"], cfgs["inference"],  # type: ignore[arg-type]
                   cfgs["exec"], implied, cfgs["correction"])  # type: ignore[arg-type]


def format_value(v: Any) -> str:
    """A typed value as it is written on the command line."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return LIST_SEPARATOR.join(format_value(x) for x in v)
    return str(v)


def build_settings(sweep: Sequence[SweepItem | str], *, defaults: Mapping[str, Any] | None = None,
                   mode: str = "one-at-a-time", extra: Sequence[tuple[str, Mapping[str, Any]]] = ()) -> list[Setting]:
    """The baseline first, then the sweep's settings (items as parsed by :func:`parse_sweep` or as text),
    then ``extra`` named settings (e.g. a deployment target's), all on ``defaults``."""
    if mode not in ("one-at-a-time", "product"):
        raise ValueError(f"sweep mode: {mode!r} is not one of one-at-a-time, product")
    items = [parse_item(i) if isinstance(i, str) else i for i in sweep]
    combos: list[tuple[str, Changes]] = []
    if mode == "product" and items:
        for combo in itertools.product(*items):
            merged: Changes = {}
            for _, ch in combo:
                merged.update(ch)
            combos.append(("+".join(n for n, _ in combo), merged))
    else:
        combos = [c for it in items for c in it]
    settings = [make_setting("baseline", {}, defaults)]
    seen = {"baseline"}
    for name, changes in combos:
        if name in seen:
            continue
        seen.add(name)
        settings.append(make_setting(name, changes, defaults))
    for extra_name, extra_over in extra:
        settings.append(make_setting(extra_name, extra_over, defaults))
    return settings


__all__ = ["ALIASES", "BASELINE_OFF", "GROUPS", "LIST_SEPARATOR", "SWITCHES", "ExecConfig", "Setting", "SweepItem",
           "implied_switches",
           "build_settings", "canonical", "format_value", "make_setting", "parse_item", "parse_sweep", "parse_value",
           "typed"]
