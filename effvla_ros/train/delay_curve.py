"""The delay curve: closed-loop success against emulated inference delay, one line per real-time chunking method.

``benchmarks/bench_delay_curve.py`` runs it (every (method, delay) one :mod:`effvla_ros.train.evaluate` setting on
the same seeds); the report lies beside the checkpoint (``eval_delay_curve.json``) and the parameter files' RTC
defaults are checked against it (``test/test_rtc_defaults.py``). The methods, each on the default compression of
``config/base.yaml`` (task pruning 0.5 + token reuse):

* ``no_rtc`` - the new chunk replaces the old one after the delay (the chunk executor's ``rtc`` / ``latest`` merge
  with ``blend_time: 0``, as ``config/sim.yaml`` runs it);
* ``guided_*`` - inference-time RTC (Black et al., arXiv 2506.07339): Jacobian-free (LeRobot 0.6.1) with beta 10
  (LeRobot's) and 3, exp and linear soft masks; the true VJP with beta 5 (the paper's);
* ``trained`` - training-time RTC (arXiv 2512.05964): the committed d actions held clean; needs a checkpoint trained
  so (``effvla train --rtc-train-max-delay N``);
* ``a2c2`` - no RTC, and every executed action corrected by the checkpoint's correction head (A2C2, arXiv 2509.23224;
  :mod:`effvla_ros.core.correction`) from the measured joints and the frames of :data:`A2C2_LAG` steps before it (the
  ``chunk_corrector`` node's lag in the graph); needs ``correction_head.*`` beside the checkpoint (``effvla
  train-correction``);
* ``a2c2_compressor`` - the same with the head reading the token compressor's tokens of every frame (before
  pruning) instead of a fresh encode (the chunk_corrector's ``visual_source: compressor``).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

#: the default compression of config/base.yaml, under every method
COMPRESSION: dict[str, Any] = {"pruning.keep_ratio": 0.5, "reuse.enabled": True}
_GUIDED: dict[str, Any] = {"rtc.enabled": True, "rtc.mode": "guided"}
METHODS: dict[str, dict[str, Any]] = {
    "no_rtc": {"rtc.enabled": False},
    "guided_jf_b10_exp": {**_GUIDED, "rtc.guidance": "jacobian_free", "rtc.max_guidance_weight": 10.0,
                          "rtc.schedule": "exp"},
    "guided_jf_b3_exp": {**_GUIDED, "rtc.guidance": "jacobian_free", "rtc.max_guidance_weight": 3.0,
                         "rtc.schedule": "exp"},
    "guided_jf_b10_linear": {**_GUIDED, "rtc.guidance": "jacobian_free", "rtc.max_guidance_weight": 10.0,
                             "rtc.schedule": "linear"},
    "guided_vjp_b5_exp": {**_GUIDED, "rtc.guidance": "vjp", "rtc.max_guidance_weight": 5.0, "rtc.schedule": "exp"},
    "trained": {"rtc.enabled": True, "rtc.mode": "trained"},
    "a2c2": {"rtc.enabled": False, "correction.enabled": True},
    "a2c2_compressor": {"rtc.enabled": False, "correction.enabled": True, "exec.correction_tokens": "compressor"},
}
#: the observation lag (control steps) of the per-step correction in the graph: the chunk_corrector's residuals
#: from the frames of step k reach rows from k + 1 on, row k being committed already (the chunk executor's
#: diagnostics measured correction.age_steps 1.00 in the simulated graph, docs/benchmarks.md); eval-sim's
#: ``exec.correction_lag`` emulates it
A2C2_LAG = 1


def setting_name(method: str, delay: int) -> str:
    return f"{method}@d{delay}"


def method_of(params: Mapping[str, Any]) -> str:
    """The :data:`METHODS` name of the policy parameters ``params`` (``rtc.*``, flattened, defaults applied);
    ValueError if they are no measured method."""
    if params.get("correction.enabled"):
        name = "a2c2_compressor" if params.get("correction.visual_source") == "compressor" else "a2c2"
        return name if not params["rtc.enabled"] else f"{name} with rtc ({params['rtc.mode']})"
    if not params["rtc.enabled"]:
        return "no_rtc"
    if params["rtc.mode"] == "trained":
        return "trained"
    for name, m in METHODS.items():
        if all(params[k] == v for k, v in m.items()):
            return name
    raise ValueError(f"RTC parameters {dict(params)} are none of the measured methods {list(METHODS)}")


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of k successes in n."""
    if n == 0:
        return (math.nan, math.nan)
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (mid - half, mid + half)


def curve_of(report: Mapping[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    """method -> str(delay) -> {successes, episodes, switch_jump (rad, when recorded)} from an eval report."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for s in report["settings"]:
        method, _, d = s["name"].rpartition("@d")
        point: dict[str, float] = {"successes": int(s["successes"]), "episodes": int(s["episodes"])}
        if "switch_jump" in s["per_inference"]:
            point["switch_jump"] = float(s["per_inference"]["switch_jump"])
        out.setdefault(method, {})[d] = point
    return out


def format_curve(curve: Mapping[str, Mapping[str, Mapping[str, float]]]) -> str:
    """A fixed-width table: one row per method, successes / episodes per delay."""
    delays = sorted({int(d) for v in curve.values() for d in v})
    rows = ["method".ljust(22) + "".join(f"d={d}".rjust(10) for d in delays)]
    for method, pts in curve.items():
        cells = []
        for d in delays:
            v = pts.get(str(d))
            cells.append((f"{int(v['successes'])}/{int(v['episodes'])}" if v else "-").rjust(10))
        rows.append(method.ljust(22) + "".join(cells))
    return "\n".join(rows)
