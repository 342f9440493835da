"""The TensorRT backend: the engines that ``build_engines_<target>.sh`` (written by ``effvla export``) built from
the stage graphs, run with TensorRT's Python runtime on torch CUDA tensors (no host copies between stages).

Same stage boundaries and capabilities as the ONNX Runtime backend (:mod:`.ort`): pruning through the dynamic
prefix length within each engine's optimization profile, early exit at the exported segment ends, RTC in the
shared integrator; patch-level reuse, expert reuse and VJP guidance refused by name.

Needs a CUDA GPU, the ``tensorrt`` package and engines built on that device (``export_dir/engines/<target>/``).
An engine built for other shapes (a prefix longer than its profile's maximum, other input names) is refused with
the file named. Tested only where a GPU is present (``test/test_export_onnx.py`` skips elsewhere).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from effvla_ros.core.smolvla.policy import SmolVLAPolicy
from effvla_ros.core.stages import ExpertPlan, PrefixCache

from .base import CapabilityError
from .exported import ExportedStages, ExportError, load_manifest
from .ort import _capabilities

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int64": torch.int64,
           "bool": torch.bool}


class _Engine:
    """One deserialized engine and its execution context; ``run`` binds torch tensors by name."""

    def __init__(self, trt: Any, runtime: Any, path: Path, inputs: Mapping[str, list[Any]],
                 outputs: Mapping[str, list[Any]]) -> None:
        self.path = path
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise ExportError(f"{path}: TensorRT cannot deserialize it (built by another TensorRT version or GPU?)")
        names = {self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)}
        if names != set(inputs) | set(outputs):
            raise ExportError(f"{path}: engine tensors {sorted(names)} do not match the manifest's "
                              f"{sorted(set(inputs) | set(outputs))}: rebuild it from this export")
        self.context = self.engine.create_execution_context()
        self.inputs, self.outputs = dict(inputs), dict(outputs)
        self.max_p: int | None = None
        for name, (shape, _) in self.inputs.items():
            if "P" in shape:
                _, _, hi = self.engine.get_tensor_profile_shape(name, 0)
                self.max_p = int(hi[shape.index("P")])

    def run(self, feeds: Mapping[str, Tensor], p: int | None = None) -> list[Tensor]:
        if p is not None and self.max_p is not None and p > self.max_p:
            raise ExportError(f"{self.path}: built for prefix lengths up to {self.max_p}, got {p}: rebuild the engines "
                              "for this target (build_engines_<target>.sh) or lower pruning.keep_ratio")
        for name, t in feeds.items():
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        outs = []
        for name, (_, dtype) in self.outputs.items():
            out = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=_DTYPES[dtype], device="cuda")
            self.context.set_tensor_address(name, out.data_ptr())
            outs.append(out)
        if not self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise RuntimeError(f"{self.path}: TensorRT execution failed")
        return outs


class TensorRTBackend(ExportedStages):
    name = "tensorrt"

    def __init__(self, policy: SmolVLAPolicy, export_dir: str | Path | None = None, target: str | None = None,
                 providers: Sequence[str] | None = None) -> None:
        del providers
        try:
            import tensorrt as trt
        except ImportError as e:
            raise CapabilityError(f"backend: 'tensorrt' needs the tensorrt Python package ({e}); JetPack ships it, "
                                  "elsewhere `pip install tensorrt`") from None
        if policy.device.type != "cuda":
            raise CapabilityError(f"device: 'tensorrt' runs on a CUDA device, the policy is on {policy.device}")
        self.policy = policy
        self.manifest = load_manifest(export_dir)
        self.export_dir = Path(str(export_dir)).expanduser()
        self.manifest.check(policy, self.export_dir)
        self.caps = _capabilities(self.name, self.manifest)
        engines = self.export_dir / "engines"
        if target is None:
            found = sorted(p.name for p in engines.glob("*") if p.is_dir()) if engines.is_dir() else []
            if len(found) != 1:
                raise ExportError(f"{engines}: {'no' if not found else 'several'} engine directories ({found}); "
                                  "build them with build_engines_<target>.sh and set the target")
            target = found[0]
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engines: dict[str, _Engine] = {}
        for name, spec in self.manifest.stages.items():
            path = engines / target / f"{name}.plan"
            if not path.is_file():
                raise ExportError(f"{path}: missing; run {self.export_dir}/build_engines_{target}.sh on this device")
            self.engines[name] = _Engine(trt, runtime, path, spec.inputs, spec.outputs)
        self.dtype = _DTYPES[self.manifest.dtype]
        self._kv: tuple[PrefixCache, int, tuple[Tensor, Tensor]] | None = None

    def encode(self, pixels: Tensor) -> Tensor:
        outs = [self.engines["vision"].run({"pixels": p[None].float().contiguous()})[0] for p in pixels]
        return torch.cat(outs, dim=0)

    def prefill(self, cache: PrefixCache, start: int, stop: int) -> None:
        self._check_prefill(cache, start)
        segments = self.manifest.segments_between(start, stop)
        assert cache.hidden is not None and cache.att_2d is not None
        h = cache.hidden.to(self.dtype).contiguous()
        pos, att = cache.position_ids.contiguous(), cache.att_2d.contiguous()
        for a, b in segments:
            h, keys, values = self.engines[f"prefill_{a}_{b}"].run(
                {"hidden": h, "position_ids": pos, "att_2d": att}, p=cache.length)
            cache.keys.extend(keys.unbind(0))
            cache.values.extend(values.unbind(0))
        cache.hidden = h

    def velocity(self, cache: PrefixCache, x_t: Tensor, t: Tensor, *, step: int = -1,
                 plan: ExpertPlan | None = None) -> Tensor:
        if plan is not None:
            raise CapabilityError(f"expert_reuse.enabled: not supported by the {self.name!r} backend")
        s = x_t.shape[1]
        if self._kv is None or self._kv[0] is not cache or self._kv[1] != len(cache.keys):
            layers = self.manifest.expert_layers
            vk = torch.stack([cache.keys[i] for i in layers]).to(self.dtype).contiguous()
            vv = torch.stack([cache.values[i] for i in layers]).to(self.dtype).contiguous()
            k, v = self.engines["expert_kv"].run({"vlm_keys": vk, "vlm_values": vv}, p=cache.length)
            self._kv = (cache, len(cache.keys), (k, v))
        k, v = self._kv[2]
        t = torch.as_tensor(t, dtype=torch.float32, device=x_t.device)
        t_tok = (t.reshape(1, s) if t.ndim == 2 else t.reshape(-1)[:1].expand(1, s)).contiguous()
        return self.engines["velocity"].run({"x_t": x_t.float().contiguous(), "t": t_tok,
                                             "pad_mask": cache.pad_mask.contiguous(), "keys": k, "values": v},
                                            p=cache.length)[0].float()
