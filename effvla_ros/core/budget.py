"""Latency-budget mode: every inference picks the efficiency settings that keep the latency under a budget with
the least change to the actions, from a table calibrated offline on the user's own recording.

The table (``effvla calibrate-budget BAG --checkpoint CKPT --out table.yaml``) lists settings - kept-token ratio,
the encoder's temporal reuse (the compressor's ``reuse.*``: at real size the vision encoder is most of the latency),
VLM early exit, expert reuse, denoising steps, named by the nodes' ROS parameters - with what ``effvla replay``
measured for each on that bag: the p95 latency of an observation's inference (encoder + prefill + denoising) and
the deviation of its actions from the unconstrained policy (normalized RMSE; the unconstrained row deviates 0).

At run time (policy parameter ``latency_budget_ms``, table in ``latency_budget_table``) the
:class:`BudgetController` predicts each setting's latency as its calibrated latency times the current *slowdown*
- a high percentile of measured / calibrated latency over the last inferences, or the last one where higher, so a
CPU slowed by a competing load, or a warmer one, moves every prediction together - and picks, among the settings predicted within the
budget less a planning margin (``latency_budget_margin``, a fraction of the budget), the one with the least deviation. When none is, it picks the fastest and says so (``feasible`` False,
with the numbers). The choice, the prediction and the margin go to the node's diagnostics.

No ROS here; the policy node applies a choice (:func:`apply_overrides`) to its configs and sends the kept-token
ratio to the token compressor.
"""
from __future__ import annotations

import dataclasses
import math
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from effvla_ros.core.params import ConfigBase, param
from effvla_ros.core.settings import BASELINE_OFF, canonical, implied_switches, make_setting, typed

TABLE_VERSION = 1
#: the settings a budget may change (canonical names); everything else stays as the nodes are configured
BUDGET_GROUPS = ("pruning", "reuse", "early_exit", "expert_reuse", "inference")
DEFAULT_GRID = ("pruning.keep_ratio=1.0,0.5,0.25", "num_steps=10,5", "expert_reuse.enabled=false,true")


@dataclass
class BudgetConfig(ConfigBase):
    """Latency-budget mode (ROS parameters of the policy node, no prefix)."""

    latency_budget_ms: float = param(0.0, min=0.0, max=60000.0,
                                     description="latency budget per inference (encoder + prefill + denoising), ms; "
                                                 "each inference picks its settings from latency_budget_table to stay "
                                                 "under it with the least action deviation (0: off)")
    latency_budget_table: str = param("", description="YAML of `effvla calibrate-budget` (settings with their "
                                                      "calibrated latency and deviation)")
    latency_budget_window: int = param(20, min=1, max=1000,
                                       description="recent inferences whose measured / calibrated latency ratio sets "
                                                   "the slowdown (its 95th percentile)")
    latency_budget_margin: float = param(0.1, min=0.0, max=0.9,
                                         description="fraction of the budget kept free when choosing: a setting is "
                                                     "chosen only if its predicted latency is within (1 - margin) x "
                                                     "latency_budget_ms (absorbs the spread of a short calibration)")
    latency_budget_compressor: str = param("token_compressor",
                                           description="node whose pruning parameters the budget sets (tokens "
                                                       "input; relative names resolve in the policy's namespace)")


@dataclass
class BudgetEntry:
    name: str
    overrides: dict[str, Any]   # canonical parameter name -> value (on top of every optimization off)
    latency_ms: float           # p95 latency of one observation's inference at calibration
    deviation: float            # normalized RMSE of the actions vs the unconstrained setting (0 for it)
    max_abs: float = 0.0        # max |action difference| vs the unconstrained setting
    latency_p50_ms: float = math.nan
    flops_fraction: float | None = None


@dataclass
class BudgetTable:
    entries: list[BudgetEntry]
    source: dict[str, Any] = field(default_factory=dict)  # bag, checkpoint, machine, date, replay settings
    version: int = TABLE_VERSION

    def __post_init__(self) -> None:
        if not self.entries:
            raise ValueError("entries: a budget table needs at least one setting")
        names = [e.name for e in self.entries]
        if len(set(names)) != len(names):
            raise ValueError(f"entries: setting names repeat ({names})")
        for e in self.entries:
            if not (e.latency_ms > 0 and math.isfinite(e.latency_ms)):
                raise ValueError(f"entries[{e.name}].latency_ms: {e.latency_ms!r} is not a positive number")
            if not (e.deviation >= 0 and math.isfinite(e.deviation)):
                raise ValueError(f"entries[{e.name}].deviation: {e.deviation!r} is not a non-negative number")
            for k, v in e.overrides.items():
                group = canonical(k).split(".")[0]
                if group not in BUDGET_GROUPS:
                    raise ValueError(f"entries[{e.name}].overrides: {k!r} is not a budget setting (groups "
                                     f"{', '.join(BUDGET_GROUPS)})")
                typed(k, v)  # raises ValueError naming the parameter
            try:  # the values too (ranges, choices), as the configs check them
                make_setting(e.name, e.overrides)
            except ValueError as err:
                raise ValueError(f"entries[{e.name}].overrides: {err}") from None

    # -- files ------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "source": self.source,
                "entries": [{k: v for k, v in dataclasses.asdict(e).items()
                             if not (isinstance(v, float) and math.isnan(v))} for e in self.entries]}

    def save(self, path: str | Path) -> Path:
        import yaml

        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("# latency-budget table (effvla calibrate-budget); the policy's latency_budget_table\n"
                     + yaml.safe_dump(self.to_dict(), sort_keys=False))
        return p

    @classmethod
    def load(cls, path: str | Path) -> BudgetTable:
        """Read a table; ValueError naming the file and what is wrong with it."""
        import yaml

        p = Path(path).expanduser()
        if not p.is_file():
            raise ValueError(f"latency_budget_table: {p} does not exist (write it with `effvla calibrate-budget`)")
        try:
            data = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ValueError(f"latency_budget_table: {p} is not YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, Mapping) or not isinstance(data.get("entries"), list):
            raise ValueError(f"latency_budget_table: {p} has no 'entries' list (not a budget table)")
        if data.get("version") != TABLE_VERSION:
            raise ValueError(f"latency_budget_table: {p} is version {data.get('version')!r}, this reads {TABLE_VERSION}")
        try:
            entries = [BudgetEntry(**e) for e in data["entries"]]
            return cls(entries, dict(data.get("source") or {}), TABLE_VERSION)
        except (TypeError, ValueError) as e:
            raise ValueError(f"latency_budget_table: {p}: {e}") from None


@dataclass(frozen=True)
class BudgetChoice:
    entry: BudgetEntry
    predicted_ms: float     # the entry's calibrated latency x the current slowdown
    budget_ms: float
    slowdown: float
    feasible: bool          # some setting was predicted within the budget

    @property
    def margin_ms(self) -> float:
        return self.budget_ms - self.predicted_ms

    def describe(self) -> str:
        if self.feasible:
            return (f"{self.entry.name}: predicted {self.predicted_ms:.0f} ms of {self.budget_ms:.0f} ms "
                    f"(margin {self.margin_ms:.0f} ms, slowdown x{self.slowdown:.2f}, deviation {self.entry.deviation:.3f})")
        return (f"no setting meets {self.budget_ms:.0f} ms at slowdown x{self.slowdown:.2f}: the fastest, "
                f"{self.entry.name}, predicts {self.predicted_ms:.0f} ms")


class BudgetController:
    """Chooses a table entry per inference (see the module docstring).

    ``window``: recent measurements kept; ``percentile``: of measured / calibrated latency, the slowdown (95: the
    budget holds for the p95 latency); ``min_slowdown``: never predict faster than this fraction of calibration;
    ``margin``: the fraction of the budget kept free when choosing (``feasible`` means within the budget less it).
    """

    def __init__(self, table: BudgetTable, budget_ms: float, *, window: int = 20, percentile: float = 95.0,
                 min_slowdown: float = 0.5, margin: float = 0.0) -> None:
        if not budget_ms > 0:
            raise ValueError(f"latency_budget_ms: {budget_ms!r} must be positive (0 turns the budget mode off)")
        if not 0.0 <= margin < 1.0:
            raise ValueError(f"latency_budget_margin: {margin!r} must be in [0, 1)")
        self.table = table
        self.budget_ms = float(budget_ms)
        self.margin = float(margin)
        self.percentile = float(percentile)
        self.min_slowdown = float(min_slowdown)
        self._ratios: deque[float] = deque(maxlen=max(1, int(window)))
        self._by_name = {e.name: e for e in table.entries}
        self.last: BudgetChoice | None = None
        self.history: deque[tuple[float, str, float, float]] = deque(maxlen=1000)  # (time, entry, predicted, measured)

    @property
    def slowdown(self) -> float:
        """How much slower than at calibration inference runs now (1.0 until measured): the window's high percentile,
        or the last measurement where that is higher (a load that just began moves the very next choice; measured at
        real size: waiting for the percentile cost a second over-budget step)."""
        if not self._ratios:
            return 1.0
        return max(self.min_slowdown, float(np.percentile(np.asarray(self._ratios), self.percentile)), self._ratios[-1])

    @property
    def target_ms(self) -> float:
        """What a choice plans for: the budget less the margin."""
        return self.budget_ms * (1.0 - self.margin)

    def choose(self) -> BudgetChoice:
        s = self.slowdown
        entries = self.table.entries
        within = [e for e in entries if e.latency_ms * s <= self.target_ms]
        if within:
            best = min(within, key=lambda e: (e.deviation, e.latency_ms))
            choice = BudgetChoice(best, best.latency_ms * s, self.budget_ms, s, True)
        else:
            fastest = min(entries, key=lambda e: (e.latency_ms, e.deviation))
            choice = BudgetChoice(fastest, fastest.latency_ms * s, self.budget_ms, s, False)
        self.last = choice
        return choice

    def observe(self, entry_name: str, measured_ms: float) -> None:
        """The measured latency of an inference that ran under ``entry_name``."""
        e = self._by_name.get(entry_name)
        if e is None or not (measured_ms > 0 and math.isfinite(measured_ms)):
            return
        self._ratios.append(measured_ms / e.latency_ms)
        self.history.append((time.monotonic(), entry_name, e.latency_ms * self.slowdown, float(measured_ms)))


def apply_overrides(configs: Mapping[str, Any], overrides: Mapping[str, Any], *, from_baseline: bool = False
                    ) -> dict[str, Any]:
    """The node's configs by group (``pruning``, ``reuse``, ``early_exit``, ``expert_reuse``, ``inference``) with an entry's
    overrides applied field by field (every other field as configured); validated by the configs.
    ``from_baseline``: first switch every budget group off, as the table's settings were calibrated (an entry
    that does not turn pruning on runs without it, whatever the node's parameters say). A field of a group turns
    that group on unless the entry sets its switch (``pruning.keep_ratio`` implies ``pruning.method: task``), as
    in the ``--sweep`` grammar."""
    out = dict(configs)
    changes: dict[str, dict[str, Any]] = {}
    if from_baseline:
        for k, v in BASELINE_OFF.items():
            group, fld = k.split(".", 1)
            if group in BUDGET_GROUPS and group in out:
                changes.setdefault(group, {})[fld] = v
    given = {canonical(k): typed(k, v) for k, v in overrides.items()}
    for name, v in {**given, **implied_switches(given)}.items():  # keep_ratio -> pruning on, as in a --sweep
        group, fld = name.split(".", 1)
        changes.setdefault(group, {})[fld] = v
    for group, fields in changes.items():
        if group in out:
            out[group] = dataclasses.replace(out[group], **fields)
    return out


def check_runnable(table: BudgetTable, configs: Mapping[str, Any], caps: Any, *, compressor: bool = True) -> None:
    """Every entry of ``table`` applies to ``configs`` (:func:`apply_overrides`, validated by the configs) and runs on
    a backend of capabilities ``caps``; ValueError naming the first entry that does not. ``compressor``: the token
    compressor runs on that backend too, so an entry's patch-level reuse is checked against it."""
    for e in table.entries:
        try:
            c = apply_overrides(configs, e.overrides, from_baseline=True)
            caps.check(early_exit=c["early_exit"].enabled, expert_reuse=c["expert_reuse"].enabled,
                       patch_reuse=compressor and c["reuse"].enabled and c["reuse"].patch_level)
        except (TypeError, ValueError) as err:  # CapabilityError is a ValueError
            raise ValueError(f"setting {e.name!r} cannot run here: {err}") from None


def backend_mismatch(table: BudgetTable, backend: str) -> str | None:
    """A warning when ``table`` was calibrated on another stage backend than ``backend`` (None when it was not, or
    the table does not say)."""
    calibrated = table.source.get("backend")
    if not calibrated or calibrated == backend:
        return None
    return (f"the latency-budget table was calibrated on the {calibrated!r} backend, this runs {backend!r}: its "
            "latencies are scaled by the measured slowdown, but the settings' relative costs may differ (calibrate "
            "with `effvla calibrate-budget --backend ...`)")


def configure_changed(cfgs: Mapping[str, Any], runner: Any, compressor: Any = None) -> None:
    """Apply a budget choice's configs (:func:`apply_overrides`) to a :class:`~effvla_ros.core.runner.PolicyRunner`
    and, where given, a :class:`~effvla_ros.core.compression.compressor.TokenCompressor`: only the groups that changed
    (early exit keeps its reference prefix, the compressor its caches)."""
    if cfgs["inference"] != runner.inference:
        runner.configure(inference=cfgs["inference"])
    if cfgs["early_exit"] != runner.prefix_reuse.cfg:
        runner.configure(early_exit=cfgs["early_exit"])
    if cfgs["expert_reuse"] != runner.expert_reuse.cfg:
        runner.configure(expert_reuse=cfgs["expert_reuse"])
    if compressor is not None and (cfgs["pruning"] != compressor.pruning or cfgs["reuse"] != compressor.reuse):
        compressor.configure(cfgs["pruning"], cfgs["reuse"])


def entries_from_replay(report: Mapping[str, Any], runs: Sequence[Any] | None = None, warmup: int = 0
                        ) -> list[BudgetEntry]:
    """Budget entries from an ``effvla replay`` report: per setting its p95 / p50 total latency and its deviation
    from the report's baseline (the first setting: the unconstrained one). With the replay's ``runs``, the latencies
    leave out each setting's first ``warmup`` observations (first calls of a shape allocate and warm caches)."""
    entries = []
    for i, s in enumerate(report["settings"]):
        lat = s["latency_ms"]["total"]
        if runs is not None and len(runs[i].steps) > warmup:
            ms = np.asarray([st.total_s for st in runs[i].steps[warmup:]]) * 1e3
            lat = {"p95": float(np.percentile(ms, 95)), "p50": float(np.percentile(ms, 50))}
        dev = s.get("deviation_vs_baseline") or {}
        overrides = {k: v for k, v in (s.get("overrides") or {}).items() if canonical(k).split(".")[0] in BUDGET_GROUPS}
        entries.append(BudgetEntry(
            name=s["name"], overrides=overrides, latency_ms=float(lat["p95"]), latency_p50_ms=float(lat["p50"]),
            deviation=float(dev.get("nrmse") or 0.0), max_abs=float(dev.get("max_abs") or 0.0),
            flops_fraction=(s.get("flops_per_step") or {}).get("fraction_of_baseline")))
    return entries


def grid_sweep(grid: Sequence[str]) -> list[str]:
    """The ``--sweep`` items of a calibration grid (each item one axis; the replay runs their product)."""
    return [g for g in grid if g.strip()]
