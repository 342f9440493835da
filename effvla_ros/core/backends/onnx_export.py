"""Export SmolVLA's stages to ONNX (torch's dynamo exporter), cut where the hooks sit.

    vision.onnx          pixels (1, 3, S, S) in [-1, 1]                    -> tokens (1, N, D_vlm)
    prefill_<a>_<b>.onnx hidden (1, P, D_vlm), position_ids (1, P),
                         att_2d (1, P, P)                                  -> hidden (1, P, D_vlm),
                                                                              keys / values (b - a, 1, Hkv, P, Dh)
    expert_kv.onnx       VLM keys / values of the expert's layers (E, 1, Hkv, P, Dh)
                                                                           -> the expert's K/V (E, 1, Hkv, P, Dh)
    velocity.onnx        x_t (1, C, A), t (1, C) per token, pad_mask (1, P),
                         expert keys / values (E, 1, Hkv, P, Dh)           -> v_t (1, C, A)

P (the prefix length) is dynamic: pruning changes it every frame. The graphs are traced from the same per-layer
functions the eager reference runs (:mod:`effvla_ros.core.smolvla.layers`; the velocity through
:meth:`SmolVLAPolicy.velocity` itself), so an exported stage computes what the reference computes. What stays
outside, in the core, is written once for every backend: pruning (it only sets P), VLM early exit (the prefill
stops at a segment end; segments are the exit points, "all" = one per layer), the Euler loop with real-time
chunking (Jacobian-free guidance calls the velocity graph; trained RTC gives per-token time), the prefix
embedding (a table lookup and the state projection).

Not exported (refused by the exported backends' capabilities, naming the parameter): the Eventful partial encode
(``reuse.patch_level``; frame-level reuse works), expert feature reuse (``expert_reuse.enabled``: it decides per
layer inside the velocity), VJP guidance (``rtc.guidance=vjp``: no autograd through a runtime).

After LeRobot's and tether's cut at the K/V and the velocity step, and the split TensorRT SmolVLA engines
published for Orin Nano (a monolithic engine ran out of memory on 8 GB).
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from effvla_ros.core.smolvla import layers as L  # noqa: N812
from effvla_ros.core.smolvla.policy import SmolVLAPolicy
from effvla_ros.core.stages import PrefixCache

from .exported import FORMAT, Manifest, StageSpec, arch_fields, checkpoint_sha256, prefix_profile, segments_for

OPSET = 20  # ONNX opset of the graphs (TensorRT 10 and ONNX Runtime >= 1.15 read it)
ONNX_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
               torch.int64: "int64", torch.bool: "bool"}


# ------------------------------------------------------------------------------------------------ stage modules
class VisionStage(nn.Module):
    """Full-frame encode of one camera image: :meth:`SmolVLAPolicy.encode_pixels`."""

    def __init__(self, policy: SmolVLAPolicy) -> None:
        super().__init__()
        self.policy = policy
        self.weights = policy.weights  # registered: the exporter sees the parameters

    def forward(self, pixels: Tensor) -> Tensor:
        return self.policy.encode_pixels(pixels)                                 # (1, N, D_vlm)


class PrefillSegment(nn.Module):
    """VLM layers [start, stop) over the prefix (:func:`.layers.vlm_layer`, LeRobot's eager attention)."""

    def __init__(self, policy: SmolVLAPolicy, start: int, stop: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(policy.weights.text.layers[start:stop])

    def forward(self, hidden: Tensor, position_ids: Tensor, att_2d: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        keys, values = [], []
        h = hidden                                                               # (1, P, D)
        for layer in self.layers:
            h, k, v, _ = L.vlm_layer(layer, h, position_ids, att_2d)
            keys.append(k)                                                       # (1, Hkv, P, Dh)
            values.append(v)
        return h, torch.stack(keys), torch.stack(values)


class ExpertKVStage(nn.Module):
    """The K/V each expert layer attends to, once per chunk: cross-attention layers project the VLM's K/V
    (:func:`.layers.expert_cross_kv`), self-attention layers take them as they are."""

    def __init__(self, policy: SmolVLAPolicy) -> None:
        super().__init__()
        self.policy = policy
        emap = policy.expert_layer_map()
        self.vlm_layers = policy.expert_layer_indices()
        self.expert = nn.ModuleList(policy.weights.expert.layers[emap[i]] for i in self.vlm_layers)  # type: ignore[index]
        self.cross = [policy.arch.is_cross_attn_layer(i) for i in self.vlm_layers]

    def forward(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        ks, vs = [], []
        for j, layer in enumerate(self.expert):
            k, v = keys[j], values[j]                                            # (1, Hkv, P, Dh)
            if self.cross[j]:
                k, v = L.expert_cross_kv(layer, k, v)
            ks.append(k)
            vs.append(v)
        return torch.stack(ks), torch.stack(vs)


class VelocityStage(nn.Module):
    """One expert evaluation v(x_t, t): :meth:`SmolVLAPolicy.velocity` on a prefix given as its expert K/V."""

    def __init__(self, policy: SmolVLAPolicy) -> None:
        super().__init__()
        self.policy = policy
        self.weights = policy.weights
        self.vlm_layers = policy.expert_layer_indices()
        self.cross = {i for i in self.vlm_layers if policy.arch.is_cross_attn_layer(i)}

    def forward(self, x_t: Tensor, t: Tensor, pad_mask: Tensor, keys: Tensor, values: Tensor) -> Tensor:
        return self.policy.velocity(as_cache(self.policy, pad_mask, keys, values, self.vlm_layers, self.cross),
                                    x_t, t)


def as_cache(policy: SmolVLAPolicy, pad_mask: Tensor, keys: Any, values: Any, vlm_layers: Sequence[int],
             cross: set[int] | Sequence[int]) -> PrefixCache:
    """A :class:`PrefixCache` holding only what the velocity reads: the pad mask and, per expert layer (row j of
    ``keys`` / ``values`` is VLM layer ``vlm_layers[j]``), the VLM K/V (self-attention) or the expert's own
    (cross-attention, precomputed)."""
    n = policy.arch.num_vlm_layers
    ks: list[Tensor] = [keys[0]] * n
    vs: list[Tensor] = [values[0]] * n
    expert_kv: dict[int, tuple[Tensor, Tensor]] = {}
    for j, i in enumerate(vlm_layers):
        if i in cross:
            expert_kv[i] = (keys[j], values[j])
        else:
            ks[i], vs[i] = keys[j], values[j]
    return PrefixCache(ks, vs, pad_mask, pad_mask, pad_mask.long(), pad_mask, {}, {}, expert_kv=expert_kv)


# ------------------------------------------------------------------------------------------------ export
@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporter prints progress lines and warnings per graph; keep them out of the command's output."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        level = logging.getLogger("torch").level
        logging.getLogger("torch").setLevel(logging.ERROR)
        try:
            yield
        finally:
            logging.getLogger("torch").setLevel(level)


def _spec(names: Sequence[str], tensors: Sequence[Tensor], dynamic: Mapping[str, Mapping[int, str]]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for name, t in zip(names, tensors, strict=True):
        shape: list[Any] = list(t.shape)
        for axis, sym in dynamic.get(name, {}).items():
            shape[axis] = sym
        out[name] = [shape, ONNX_DTYPES[t.dtype]]
    return out


def _export(module: nn.Module, args: tuple[Tensor, ...], path: Path, inputs: Sequence[str], outputs: Sequence[str],
            dynamic: Mapping[str, Mapping[int, str]], opset: int) -> StageSpec:
    """Trace ``module`` with the dynamo exporter, save it (weights in an external data file beside it) and check
    it with ONNX's checker; the StageSpec records names, shapes (dynamic axes named) and dtypes."""
    import onnx
    from torch.export import Dim

    dims = {sym: Dim(sym, min=2, max=1 << 14) for axes in dynamic.values() for sym in axes.values()}
    shapes = tuple({axis: dims[sym] for axis, sym in dynamic[n].items()} if n in dynamic else None for n in inputs)
    module.eval()
    with torch.no_grad(), _quiet():
        outs = module(*args)
        program = torch.onnx.export(module, args, dynamo=True, opset_version=opset, input_names=list(inputs),
                                    output_names=list(outputs), dynamic_shapes=shapes, verbose=False)
        assert program is not None
        data = path.with_suffix(".onnx.data")
        if data.exists():
            data.unlink()
        program.save(str(path), external_data=True)
    onnx.checker.check_model(str(path))  # by path: models with external data
    outs = outs if isinstance(outs, tuple) else (outs,)
    return StageSpec(path.name, _spec(inputs, args, dynamic), _spec(outputs, outs, dynamic))


def stage_inputs(policy: SmolVLAPolicy, cache: PrefixCache) -> dict[str, Any]:
    """Example inputs of each stage for one prefix (the cache after a full eager prefill)."""
    arch = policy.arch
    layers = policy.expert_layer_indices()
    return {
        "keys": torch.stack([cache.keys[i] for i in layers]),
        "values": torch.stack([cache.values[i] for i in layers]),
        "x_t": torch.randn(1, arch.chunk_size, arch.max_action_dim, generator=torch.Generator().manual_seed(0)),
        "t": torch.full((1, arch.chunk_size), 0.7),
    }


@torch.no_grad()
def export_policy(policy: SmolVLAPolicy, out_dir: str | Path, *, exit_layers: Sequence[int] | str = "all",
                  targets: Mapping[str, Mapping[str, Any]] | None = None, opset: int = OPSET,
                  checkpoint: str | Path | None = None, log: Any = print) -> Manifest:
    """Write the stage graphs of ``policy`` (in its runtime dtype, which must be one dtype for every stage) and
    ``manifest.json`` to ``out_dir``. ``targets``: target -> its pruning settings (keep_ratio, min_tokens,
    coverage_regions) for the prefix-length profiles."""
    t_start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtypes = set(policy.runtime.resolved_dtypes())
    if len(dtypes) != 1:
        raise ValueError(f"dtype: the stages run {sorted(dtypes)}; an export has one dtype (--dtype)")
    dtype = dtypes.pop()
    policy.weights.requires_grad_(False)
    arch = policy.arch
    source = Path(checkpoint) if checkpoint else policy.source

    # example inputs: a dummy observation through the eager stages (the graphs are traced, not run, on them)
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(1, 3, arch.image_size, arch.image_size, generator=g) * 2 - 1
    tokens = policy.encode_pixels(pixels.to(policy.device))
    lang = torch.ones(1, 4, dtype=torch.long, device=policy.device)
    cache = policy.begin_prefill({c: tokens for c in policy.cameras}, lang, torch.ones_like(lang, dtype=torch.bool),
                                 policy.prepare_state(torch.zeros(1, arch.state_dim)))
    hidden0, pos, att = cache.hidden, cache.position_ids, cache.att_2d
    assert hidden0 is not None and att is not None
    policy.prefill_layers(cache, 0, arch.num_vlm_layers)
    ex = stage_inputs(policy, cache)
    kv_shapes = {tuple(k.shape) for k in ex["keys"]}
    P = {1: "P"}  # noqa: N806
    kv_dyn = {3: "P"}

    stages: dict[str, StageSpec] = {}
    t = time.perf_counter()
    stages["vision"] = _export(VisionStage(policy), (pixels.to(policy.device),), out / "vision.onnx", ["pixels"],
                               ["tokens"], {}, opset)
    log(f"  vision       {time.perf_counter() - t:6.1f} s")
    segments = segments_for(arch.num_vlm_layers, exit_layers)
    for a, b in segments:
        t = time.perf_counter()
        name = f"prefill_{a}_{b}"
        h_in = hidden0 if a == 0 else _hidden_after(policy, hidden0, pos, att, a)
        spec = _export(PrefillSegment(policy, a, b), (h_in, pos, att), out / f"{name}.onnx",
                       ["hidden", "position_ids", "att_2d"], ["hidden_out", "keys", "values"],
                       {"hidden": P, "position_ids": P, "att_2d": {1: "P", 2: "P"}}, opset)
        spec.outputs["hidden_out"][0][1] = "P"
        for o in ("keys", "values"):
            spec.outputs[o][0][3] = "P"
        spec.layers = [a, b]
        stages[name] = spec
        log(f"  {name:12s} {time.perf_counter() - t:6.1f} s")
    if len(kv_shapes) != 1:
        raise ValueError(f"the expert's layers attend to K/V of different shapes {sorted(kv_shapes)}: not exportable")
    t = time.perf_counter()
    spec = _export(ExpertKVStage(policy), (ex["keys"], ex["values"]), out / "expert_kv.onnx",
                   ["vlm_keys", "vlm_values"], ["keys", "values"], {"vlm_keys": kv_dyn, "vlm_values": kv_dyn}, opset)
    for o in ("keys", "values"):
        spec.outputs[o][0][3] = "P"
    stages["expert_kv"] = spec
    ekv = ExpertKVStage(policy)(ex["keys"], ex["values"])
    stages["velocity"] = _export(VelocityStage(policy), (ex["x_t"], ex["t"], cache.pad_mask, *ekv),
                                 out / "velocity.onnx", ["x_t", "t", "pad_mask", "keys", "values"], ["v_t"],
                                 {"pad_mask": P, "keys": kv_dyn, "values": kv_dyn}, opset)
    log(f"  expert       {time.perf_counter() - t:6.1f} s")

    profiles = {name: prefix_profile(policy, float(p.get("keep_ratio", 1.0)), int(p.get("min_tokens", 1)),
                                     int(p.get("coverage_regions", 0)))
                for name, p in (targets or {}).items()}
    vlm_dir = policy.vlm_dir
    manifest = Manifest(
        format=FORMAT, dtype=dtype, opset=opset, checkpoint=str(source or ""),
        checkpoint_sha256=checkpoint_sha256(source) if source else "", arch=arch_fields(policy), stages=stages,
        segments=segments, expert_layers=policy.expert_layer_indices(),
        cross_layers=[i for i in policy.expert_layer_indices() if arch.is_cross_attn_layer(i)],
        normalizer={k: v.float().flatten().tolist() for k, v in policy.normalizer.flat().items()},  # type: ignore[misc]
        tokenizer={"vlm_model_name": arch.vlm_model_name, "dir": str(vlm_dir) if vlm_dir else ""},
        targets=profiles, torch_version=torch.__version__, export_seconds=round(time.perf_counter() - t_start, 1))
    manifest.write(out)
    for name in profiles:
        write_trt_script(manifest, out, name)
    return manifest


def _hidden_after(policy: SmolVLAPolicy, hidden: Tensor, pos: Tensor, att: Tensor, layer: int) -> Tensor:
    h = hidden
    for i in range(layer):
        h = L.vlm_layer(policy.weights.text.layers[i], h, pos, att)[0]
    return h


# ------------------------------------------------------------------------------------------------ TensorRT
def _shape(spec: list[Any], p: int) -> str:
    return "x".join(str(p if d == "P" else d) for d in spec[0])


def write_trt_script(manifest: Manifest, out_dir: Path, target: str) -> Path:
    """``build_engines_<target>.sh``: one ``trtexec`` per stage, building ``engines/<target>/<stage>.plan`` with
    the optimization profile (min / opt / max prefix length) of that target. Run it on the target device: an
    engine is specific to its GPU and TensorRT version."""
    prof = manifest.targets[target]
    lines = ["#!/usr/bin/env bash",
             f"# TensorRT engines of this export for target {target}: prefix length P min {prof['min']}, "
             f"opt {prof['opt']}, max {prof['max']}",
             "# (from its pruning keep ratio). Run on the device itself; engines are specific to the GPU and the",
             "# TensorRT version. Then: ros2 launch effvla_ros manipulation.launch.py target:=" + target +
             " backend:=tensorrt export_dir:=<this directory>",
             "# PRECISION: --stronglyTyped (default) builds each layer in the dtype the ONNX graph carries "
             f"({manifest.dtype});",
             "# add e.g. PRECISION='--fp16' for an fp32 export to let TensorRT choose fp16 kernels.",
             "set -euo pipefail",
             'cd "$(dirname "$0")"',
             'TRTEXEC=${TRTEXEC:-trtexec}',
             'command -v "$TRTEXEC" >/dev/null || { echo "trtexec not found: install TensorRT (JetPack ships it in '
             '/usr/src/tensorrt/bin) or set TRTEXEC=" >&2; exit 1; }',
             'PRECISION=${PRECISION:---stronglyTyped}',
             f"mkdir -p engines/{target}"]
    for name, spec in manifest.stages.items():
        dyn = [n for n, s in spec.inputs.items() if "P" in s[0]]
        shapes = ""
        if dyn:
            for flag, key in (("--minShapes", "min"), ("--optShapes", "opt"), ("--maxShapes", "max")):
                shapes += f" {flag}=" + ",".join(f"{n}:{_shape(spec.inputs[n], prof[key])}" for n in dyn)
        lines.append(f'"$TRTEXEC" --onnx={spec.file} --saveEngine=engines/{target}/{name}.plan $PRECISION'
                     f"{shapes} --skipInference")
    lines.append(f'echo "engines written to $(pwd)/engines/{target}"')
    path = out_dir / f"build_engines_{target}.sh"
    path.write_text("\n".join(lines) + "\n")
    os.chmod(path, 0o755)
    return path
