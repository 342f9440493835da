"""The ONNX Runtime backend: the stage graphs of ``effvla export`` run by ONNX Runtime.

Execution providers in order of preference: TensorRT, CUDA, CPU, whichever this onnxruntime build has (the
``onnxruntime`` wheel has the CPU one; ``onnxruntime-gpu`` and JetPack's build add CUDA and TensorRT). The
torch policy still provides the tokenizer, the normalizer and the prefix embedding (a table lookup and the
state projection); the vision encoder, the VLM layers and the expert run in the runtime.

Hooks: pruning changes the prefix length (a dynamic axis); VLM early exit stops the prefill at the end of an
exported layer segment (``Capabilities.exit_layers`` = the segment ends); RTC guidance (Jacobian-free) and
trained RTC run in the shared integrator around ``velocity``. Refused, naming the parameter: patch-level reuse
(the partial encode is not exported), expert reuse (it decides per layer inside a velocity), VJP guidance.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from effvla_ros.core.smolvla.policy import SmolVLAPolicy
from effvla_ros.core.stages import ExpertPlan, PrefixCache

from .base import Capabilities, CapabilityError
from .exported import ExportedStages, ExportError, Manifest, load_manifest

PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
_NP = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "bool": np.bool_}


def _capabilities(name: str, manifest: Manifest) -> Capabilities:
    return Capabilities(name, exit_layers=manifest.exit_layers, expert_plans=False, partial_encode=False, vjp=False,
                        attention_probs=False)


def _torch(x: np.ndarray, device: torch.device) -> Tensor:
    return torch.from_numpy(x).to(device)


class OnnxRuntimeBackend(ExportedStages):
    """Stage graphs in ONNX Runtime sessions (one per graph), checked against the policy at construction."""

    name = "onnxruntime"

    def __init__(self, policy: SmolVLAPolicy, export_dir: str | Path | None = None,
                 providers: Sequence[str] | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as e:  # pragma: no cover - onnxruntime is a requirement
            raise CapabilityError(f"backend: 'onnxruntime' needs the onnxruntime package ({e})") from None
        self.policy = policy
        self.export_dir = Path(export_dir or os.environ.get("EFFVLA_EXPORT_DIR", "")).expanduser()
        self.manifest = load_manifest(export_dir or os.environ.get("EFFVLA_EXPORT_DIR"))
        self.manifest.check(policy, self.export_dir)
        if self.manifest.dtype == "bfloat16":
            raise ExportError(f"{self.export_dir}: a bfloat16 export is for TensorRT (--dtype bf16); ONNX Runtime runs "
                              "float32 or float16 exports")
        self.caps = _capabilities(self.name, self.manifest)
        available = ort.get_available_providers()
        wanted = [p for p in (providers or PREFERRED_PROVIDERS) if p in available]
        if not wanted:
            raise CapabilityError(f"backend: none of the execution providers {list(providers or [])} is available "
                                  f"in this onnxruntime (it has {available})")
        self.providers = wanted
        opts = ort.SessionOptions()
        threads = policy.runtime.num_threads or torch.get_num_threads()
        opts.intra_op_num_threads = max(1, int(threads))
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # One session per graph, each with its own thread pool: idle pools spin-wait by default and took the cores
        # from the running one (real size, 16 prefill segments: prefill 0.51 s spinning vs 0.21 s in one graph).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.sessions: dict[str, Any] = {}
        for name, spec in self.manifest.stages.items():
            path = self.export_dir / spec.file
            try:
                self.sessions[name] = ort.InferenceSession(str(path), opts, providers=wanted)
            except Exception as e:  # noqa: BLE001 - a runtime's load error: name the file
                raise ExportError(f"{path}: ONNX Runtime cannot load it ({type(e).__name__}: {e})") from None
        self._np_dtype = _NP[self.manifest.dtype]
        self._kv_cache: tuple[PrefixCache, int, dict[str, np.ndarray]] | None = None
        self.cross = set(self.manifest.cross_layers)

    # -- stage 1 --------------------------------------------------------------------------------------
    def encode(self, pixels: Tensor) -> Tensor:
        """(B, 3, S, S) in [-1, 1] -> (B, N, D_vlm), one image per run (the graph's batch is 1)."""
        sess = self.sessions["vision"]
        outs = [sess.run(None, {"pixels": np.ascontiguousarray(p[None].float().cpu().numpy())})[0] for p in pixels]
        return _torch(np.concatenate(outs, axis=0), self.policy.device)

    # -- stage 2 --------------------------------------------------------------------------------------
    def prefill(self, cache: PrefixCache, start: int, stop: int) -> None:
        self._check_prefill(cache, start)
        segments = self.manifest.segments_between(start, stop)
        assert cache.hidden is not None and cache.att_2d is not None
        pos = cache.position_ids.cpu().numpy()
        att = cache.att_2d.cpu().numpy()
        h: Any = cache.hidden.detach().cpu().numpy().astype(self._np_dtype, copy=False)
        for a, b in segments:
            h, keys, values = self.sessions[f"prefill_{a}_{b}"].run(
                None, {"hidden": h, "position_ids": pos, "att_2d": att})
            for j in range(b - a):
                cache.keys.append(_torch(keys[j], self.policy.device))
                cache.values.append(_torch(values[j], self.policy.device))
        cache.hidden = _torch(h, self.policy.device)

    # -- stage 3 --------------------------------------------------------------------------------------
    def expert_kv(self, cache: PrefixCache) -> dict[str, np.ndarray]:
        """The expert's K/V for ``cache`` (once per chunk; recomputed when the cache object or its layers change)."""
        key = (cache, len(cache.keys))
        if self._kv_cache is not None and self._kv_cache[0] is key[0] and self._kv_cache[1] == key[1]:
            return self._kv_cache[2]
        layers = self.manifest.expert_layers
        vk: Any = np.stack([cache.keys[i].detach().cpu().numpy() for i in layers]).astype(self._np_dtype, copy=False)
        vv: Any = np.stack([cache.values[i].detach().cpu().numpy() for i in layers]).astype(self._np_dtype, copy=False)
        k, v = self.sessions["expert_kv"].run(None, {"vlm_keys": vk, "vlm_values": vv})
        kv = {"keys": k, "values": v, "pad_mask": cache.pad_mask.cpu().numpy()}
        self._kv_cache = (cache, len(cache.keys), kv)
        return kv

    def velocity(self, cache: PrefixCache, x_t: Tensor, t: Tensor, *, step: int = -1,
                 plan: ExpertPlan | None = None) -> Tensor:
        if plan is not None:
            raise CapabilityError(f"expert_reuse.enabled: not supported by the {self.name!r} backend")
        b, s = x_t.shape[:2]
        if b != 1:
            raise ValueError(f"velocity: the exported graph takes a batch of 1, got {b}")
        t = torch.as_tensor(t, dtype=torch.float32)
        t_tok = t.reshape(1, s) if t.ndim == 2 else t.reshape(-1)[:1].expand(1, s)  # per token (1, S)
        kv = self.expert_kv(cache)
        v = self.sessions["velocity"].run(None, {
            "x_t": np.ascontiguousarray(x_t.detach().float().cpu().numpy()),
            "t": np.ascontiguousarray(t_tok.detach().cpu().numpy()), "pad_mask": kv["pad_mask"],
            "keys": kv["keys"], "values": kv["values"]})[0]
        return _torch(v, x_t.device).float()
