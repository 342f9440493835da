"""Replay outputs: ``report.json``, ``report.md`` (one table row per setting), ``actions.npz`` and PNG plots.

``report.json``::

    version, timing_keys            keys holding wall-clock values (latency_ms, wall_s)
    warnings                        what was accepted but may not be what was meant (also on stdout and in
                                    report.md): mono images into a colour policy, image size changes,
                                    JointStates dropped by reason, an interrupted recording
    bag                             path, storage, recovered (killed recording), notes, topics {type, count}
    checkpoint                      cameras, chunk_size, action_dim, state_dim, num_steps, action_std, action_names
    episode                         camera_topics, missing_cameras, state/instruction/chunk topics, instructions,
                                    mode (chunks|frames), observations, skipped {unmatched, duplicate,
                                    before_first_state}, out_of_order {topic: n}, duplicate_frames, frames,
                                    state {rule, joint_names, by_position, source, joint_map, bag_joint_names},
                                    dropped {joint_states: {reason: n}}, image_types, image_sizes ...
    replay                          seed, fps (+ source), rtc_delay_steps, executor, sweep, target
    recorded                        what the live run reported in its ActionChunks (or null)
    settings[]                      name, baseline, overrides, implied, config (every efficiency config),
                                    latency_ms {encoder, prefill, denoise, total: {p50, p95}},
                                    flops_per_step {encoder, encoder_full, prefill, denoise, total,
                                                    fraction_of_baseline},
                                    tokens {total_per_step, kept_per_step, kept_fraction, reused_per_step,
                                            encoder_passes},
                                    exit_layers {mean, histogram}, denoising_steps {mean, reused/computed
                                    expert layers per step}, rtc {guided_chunks},
                                    deviation_vs_baseline / deviation_vs_recorded {nrmse_per_joint, nrmse,
                                                    max_abs_per_joint, max_abs, n},
                                    smoothness {boundary_jump {mean, max, n}, rms_jerk(_per_joint), max_accel,
                                                max_step, samples, verdicts, clamps},
                                    per_step [...], wall_s
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from effvla_ros.replay.pipeline import ReplayResult


def _f(x: Any, fmt: str = "{:.3g}") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return fmt.format(x)


def markdown(report: dict[str, Any]) -> str:
    ep = report["episode"]
    rp = report["replay"]
    lines = [
        "# effvla replay report",
        "",
        f"- bag: `{report['bag']['path']}` ({report['bag']['storage']}"
        + (", **recovered from an interrupted recording**" if report["bag"]["recovered"] else "") + ")",
        f"- checkpoint: `{report['checkpoint']['path']}`, cameras {report['checkpoint']['cameras']}, "
        f"chunk {report['checkpoint']['chunk_size']} x {report['checkpoint']['action_dim']}",
        f"- observations: {ep['observations']} ({ep['mode']}), skipped {ep['skipped']}, out-of-order stamps "
        f"{ep['out_of_order']}, cameras {ep['camera_topics']}"
        + (f", missing cameras {ep['missing_cameras']}" if ep["missing_cameras"] else ""),
        f"- instructions: {ep['instructions']}",
        *([f"- state: {ep['state']['rule']}"] if ep.get("state") else []),
        f"- action names: {report['checkpoint']['action_names']}",
        *([f"- recorded (live run): {rec['chunks']} chunks, inference latency p50/p95 "
           f"{rec['inference_latency_ms']['p50']:.1f}/{rec['inference_latency_ms']['p95']:.1f} ms, denoising steps "
           f"{rec['denoising_steps_mean']:.1f}, exit layers {_f(rec['exit_layers_mean'], '{:.2f}')}"]
          if (rec := report.get("recorded")) else []),
        f"- seed {rp['seed']}, fps {rp['fps']:g} ({rp['fps_source']}), RTC delay {rp['rtc_delay_steps']} steps, "
        f"executor {rp['executor']['merge_strategy']} @ {rp['executor']['control_rate']:g} Hz "
        f"(limits: {rp['executor']['limits']})",
        "",
        "Latencies are wall-clock ms p50/p95 on this machine (encoder ms include the token compressor's always-on "
        "FLOP counting; prefill/denoise are timed in a pass without counting unless flops=inline); everything "
        "else is deterministic. nRMSE: per-joint "
        "RMSE / the checkpoint's action std, averaged over joints; jump: normalized L-inf disagreement of "
        "consecutive chunks at the switch; jerk: RMS of the executed command's third difference.",
        "",
        "| setting | encoder ms | prefill ms | denoise ms | total ms | GFLOP/step | vs base | tokens kept/total "
        "| reused | exit layer | steps | nRMSE vs base | max abs vs base | nRMSE vs rec | jump mean/max | RMS jerk |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in report["settings"]:
        lat = s["latency_ms"]
        fl = s["flops_per_step"]
        tk = s["tokens"]
        dv = s["deviation_vs_baseline"]
        dr = s["deviation_vs_recorded"]
        sm = s["smoothness"]
        bj = sm.get("boundary_jump", {})
        lines.append(
            f"| {s['name']} | "
            + " | ".join(f"{_f(lat[k]['p50'], '{:.1f}')}/{_f(lat[k]['p95'], '{:.1f}')}"
                         for k in ("encoder", "prefill", "denoise", "total"))
            + f" | {_f(fl['total'] / 1e9 if fl['total'] is not None else None, '{:.4g}')}"
            f" | {_f(fl.get('fraction_of_baseline'), '{:.2f}x')}"
            f" | {_f(tk['kept_per_step'], '{:.1f}')}/{_f(tk['total_per_step'], '{:.0f}')}"
            f" | {_f(tk['reused_per_step'], '{:.1f}')}"
            f" | {_f(s['exit_layers']['mean'], '{:.2f}')}"
            f" | {_f(s['denoising_steps']['mean'], '{:.0f}')}"
            f" | {_f(dv['nrmse'], '{:.4f}')} | {_f(dv['max_abs'], '{:.4f}')}"
            f" | {_f(dr['nrmse'], '{:.4f}') if dr else '–'}"
            f" | {_f(bj.get('mean'), '{:.3f}')}/{_f(bj.get('max'), '{:.3f}')}"
            f" | {_f(sm.get('rms_jerk'), '{:.3g}')} |")
    if report.get("warnings"):
        lines += ["", "**Warnings:**", *[f"- {w}" for w in report["warnings"]]]
    if report["bag"]["notes"]:
        lines += ["", "Notes:", *[f"- {n}" for n in report["bag"]["notes"]]]
    lines += ["", "Plots: `actions_<setting>.png` (executed trajectory per joint, baseline vs setting), "
              "`compute_vs_deviation.png`."]
    return "\n".join(lines) + "\n"


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", name).strip("_")[:80] or "setting"


def write_outputs(result: ReplayResult, out: Path, plots: bool = True) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "md": out / "report.md", "npz": out / "actions.npz"}
    paths["json"].write_text(json.dumps(result.report, indent=1, sort_keys=False) + "\n")
    paths["md"].write_text(markdown(result.report))
    arrays = {f"actions/{r.setting.name}": r.actions for r in result.runs}
    arrays["stamps"] = np.asarray([o.stamp for o in result.episode.observations])
    np.savez_compressed(paths["npz"], **arrays)  # type: ignore[arg-type]
    if plots:
        paths.update(write_plots(result, out))
    return paths


def write_plots(result: ReplayResult, out: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths: dict[str, Path] = {}
    names = result.action_names
    base_name = result.runs[0].setting.name
    tb, qb = result.executed.get(base_name, (np.zeros(0), np.zeros((0, len(names)))))
    t_ref = float(result.episode.observations[0].stamp) if result.episode.observations else 0.0
    rec = [(o.stamp - t_ref, o.recorded.actions[0]) for o in result.episode.observations
           if o.recorded is not None and o.recorded.actions.shape[1] == len(names)]
    for run in result.runs[1:]:
        ts, qs = result.executed.get(run.setting.name, (np.zeros(0), np.zeros((0, len(names)))))
        a = len(names)
        fig, axes = plt.subplots(a, 1, figsize=(8, 1.6 * a + 0.6), sharex=True, squeeze=False)
        for j in range(a):
            ax = axes[j][0]
            if qb.shape[0]:
                ax.plot(tb - t_ref, qb[:, j], label="baseline", color="tab:blue", lw=1.2)
            if qs.shape[0]:
                ax.plot(ts - t_ref, qs[:, j], label=run.setting.name, color="tab:orange", lw=1.0, ls="--")
            if rec:
                ax.plot([r[0] for r in rec], [r[1][j] for r in rec], "k.", ms=3, label="recorded (chunk start)")
            ax.set_ylabel(names[j], fontsize=7)
            ax.tick_params(labelsize=7)
        axes[0][0].legend(fontsize=7, loc="upper right")
        axes[-1][0].set_xlabel("time since first observation [s]")
        fig.suptitle(f"executed actions: baseline vs {run.setting.name}", fontsize=9)
        fig.tight_layout()
        p = out / f"actions_{slug(run.setting.name)}.png"
        fig.savefig(p, dpi=80)
        plt.close(fig)
        paths[f"actions:{run.setting.name}"] = p
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for s in result.report["settings"]:
        x = (s["flops_per_step"]["total"] or 0.0) / 1e9
        y = s["deviation_vs_baseline"]["nrmse"] or 0.0
        lat = s["latency_ms"]["total"]["p50"] or 0.0
        ax1.scatter([x], [y])
        ax1.annotate(s["name"], (x, y), fontsize=6)
        ax2.scatter([lat], [y])
        ax2.annotate(s["name"], (lat, y), fontsize=6)
    ax1.set_xlabel("GFLOP per step (counted)")
    ax2.set_xlabel("total latency p50 [ms] (this machine)")
    for ax in (ax1, ax2):
        ax.set_ylabel("action nRMSE vs baseline")
        ax.grid(alpha=0.3)
    fig.suptitle("compute vs deviation per setting", fontsize=9)
    fig.tight_layout()
    p = out / "compute_vs_deviation.png"
    fig.savefig(p, dpi=80)
    plt.close(fig)
    paths["compute_vs_deviation"] = p
    return paths
