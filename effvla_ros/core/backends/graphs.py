"""The cudagraph backend: the whole denoising loop of a chunk replayed as one CUDA graph over static buffers.

After Dexmal's realtime-vla and FlashRT: at SmolVLA's sizes a denoising step is hundreds of small kernels
(50 action tokens), so on a GPU the launch overhead, not the arithmetic, sets the step time. Capturing every
step of the loop once - the shared Euler integrator (:func:`effvla_ros.core.flow.euler_integrate`) with the
Jacobian-free RTC guidance of :func:`effvla_ros.core.rtc.guided_velocity` as its guide - and replaying it
turns a chunk's denoising into one launch. The graph reads static buffers allocated once per prefix shape:
every layer's prefix K/V, the expert's cross-attention K/V, the padding mask, the noise, the RTC target and
soft mask, and training-time RTC's committed prefix and its row mask; a chunk copies its values in and
replays. Without guidance the mask buffer is zero and the guided velocity equals the model's exactly
(``v - w * 0``); without a committed prefix no row is held (per-token time equal to the shared one), so one
graph serves every mode.

What the graph fixes, a capability says: no expert feature reuse (its per-layer decisions are data-dependent
host branches), no VJP guidance; the guidance weight beta and the step count are part of the graph (a new
value captures a new graph, as does a new prefix length).

The other two stages are graphs too (:class:`StaticGraph`): the full-frame encode of one camera image per
input shape, and the prefill per prefix shape and layer segment (an early-exit boundary ends a segment, so
early exit keeps working: each segment is its own graph). Their outputs are copied out of the graph's static
buffers (a prefix cache outlives the next replay: early exit reuses the last full one). What stays eager is
what varies in shape or decides on the host: the Eventful partial encode (its changed-row count), pruning, the
prefix assembly (:meth:`begin_prefill`, a few dozen small ops), the expert's per-chunk cross-attention K/V.

On a CPU the same loops run over the same buffers without capture - the fallback that the CPU tests exercise;
the capture runs where CUDA is (``test/test_cuda_graphs.py``). While FLOPs are counted (a dispatch mode watches
the ops, :func:`~effvla_ros.core.backends.base.observed`) a graph runs its function plainly, uncaptured.

Measured on an NVIDIA H200 at real size, bf16, batch one (docs/benchmarks.md): LeRobot's eager loop 0.34 s per
control step, ours eager 0.19 s, these graphs 0.036-0.039 s, the graphs over inductor-compiled layers
(:class:`CompiledGraphBackend`, ``cudagraph_compiled``) 0.018 s: at these sizes every stage is hundreds of
latency-bound kernels, so removing launches (graphs) and kernels (compiled fusion) is what pays.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from effvla_ros.core.flow import euler_integrate
from effvla_ros.core.rtc import RTCConfig, guided_velocity
from effvla_ros.core.smolvla import layers as L  # noqa: N812
from effvla_ros.core.smolvla.policy import SmolVLAPolicy
from effvla_ros.core.stages import PrefixCache

from .base import Capabilities, observed
from .eager import EagerBackend


@dataclass(frozen=True)
class _GraphKey:
    length: int
    num_steps: int
    beta: float


def _capture(graph: torch.cuda.CUDAGraph, fn: Callable[[], Any]) -> Any:
    """Warm ``fn`` up on a side stream (allocator, kernel selection), then capture it into ``graph``."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph), torch.no_grad():
        return fn()


class StaticGraph:
    """``fn(*inputs) -> Tensor | sequence of Tensor / lists of Tensor`` over static input buffers, captured as one
    CUDA graph on a CUDA device (called plainly over the same buffers elsewhere). A call copies its inputs into
    the buffers and replays; the outputs are the graph's static buffers, overwritten by the next call."""

    def __init__(self, fn: Callable[..., Any], examples: Sequence[Tensor]) -> None:
        self.fn = fn
        self.inputs = [x.detach().clone() for x in examples]
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs: Any = None
        self.replays = 0
        self.cuda = bool(self.inputs) and self.inputs[0].device.type == "cuda"

    def fits(self, inputs: Sequence[Tensor]) -> bool:
        return len(inputs) == len(self.inputs) and all(
            a.shape == b.shape and a.dtype == b.dtype and a.device == b.device for a, b in zip(inputs, self.inputs))

    @torch.no_grad()
    def __call__(self, *inputs: Tensor) -> Any:
        if not self.fits(inputs):
            raise ValueError("StaticGraph: inputs of another shape, dtype or device than the graph's")
        for dst, src in zip(self.inputs, inputs):
            dst.copy_(src)
        self.replays += 1
        if not self.cuda or observed():
            return self.fn(*self.inputs)
        if self.graph is None:  # captured at the first unobserved call
            self.graph = torch.cuda.CUDAGraph()
            self.outputs = _capture(self.graph, lambda: self.fn(*self.inputs))
        self.graph.replay()
        return self.outputs


class DenoiseGraph:
    """One chunk's denoising loop over static buffers; captured as a CUDA graph on CUDA devices."""

    def __init__(self, policy: SmolVLAPolicy, template: PrefixCache, num_steps: int, beta: float,
                 ops: Any = L) -> None:
        self.policy = policy
        self.ops = ops
        self.num_steps = num_steps
        self.rtc = RTCConfig(enabled=True, guidance="jacobian_free", max_guidance_weight=beta)
        arch = policy.arch
        dev = policy.device
        kv = policy.cross_kv(dataclasses.replace(template, expert_kv=None), ops)
        # static buffers: the graph reads these addresses on every replay
        self.cache = PrefixCache(
            keys=[torch.empty_like(k) for k in template.keys], values=[torch.empty_like(v) for v in template.values],
            pad_mask=torch.empty_like(template.pad_mask), att_mask=template.att_mask, position_ids=template.position_ids,
            embeddings=template.embeddings[:, :0], segments={}, token_index={},
            expert_kv={i: (torch.empty_like(k), torch.empty_like(v)) for i, (k, v) in kv.items()})
        shape = (1, arch.chunk_size, arch.max_action_dim)
        self.noise = torch.zeros(shape, dtype=torch.float32, device=dev)
        self.target = torch.zeros(arch.chunk_size, arch.max_action_dim, dtype=torch.float32, device=dev)
        self.mask = torch.zeros(arch.chunk_size, dtype=torch.float32, device=dev)
        # training-time RTC: the committed actions and which rows they are (none: all False, the flow unchanged)
        self.prefix = torch.zeros(shape, dtype=torch.float32, device=dev)
        self.committed = torch.zeros(arch.chunk_size, dtype=torch.bool, device=dev)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: Tensor | None = None
        self.replays = 0
        self.cuda = dev.type == "cuda"

    def _loop(self) -> Tensor:
        cache, rtc = self.cache, self.rtc

        def velocity(x: Tensor, t: Tensor, step: int) -> Tensor:
            return self.policy.velocity(cache, x, t, step=step, ops=self.ops)

        def guide(step: int, t: float, x: Tensor, v: Tensor) -> Tensor:
            return guided_velocity(x, t, lambda xx, tt: v, self.target, self.mask, rtc, v_t=v)

        return euler_integrate(velocity, self.noise, self.num_steps, guide=guide, prefix=self.prefix,
                               prefix_mask=self.committed)

    def _capture(self) -> None:
        self.graph = torch.cuda.CUDAGraph()
        self.out = _capture(self.graph, self._loop)

    def fits(self, cache: PrefixCache) -> bool:
        return (cache.length == self.cache.length and len(cache.keys) == len(self.cache.keys)
                and all(a.shape == b.shape and a.dtype == b.dtype for a, b in zip(cache.keys, self.cache.keys)))

    @torch.no_grad()
    def run(self, cache: PrefixCache, noise: Tensor, target: Tensor | None = None, mask: Tensor | None = None,
            prefix: Tensor | None = None) -> Tensor:
        """x_0 (1, S, A) of the flow from ``noise`` over ``cache``, guided toward ``target`` (S, A) with the soft
        ``mask`` (S,) when given (Jacobian-free RTC), its first d actions held at ``prefix`` (1, d, A) when given
        (training-time RTC)."""
        if not self.fits(cache):
            raise ValueError(f"DenoiseGraph: built for a prefix of {self.cache.length} tokens, got {cache.length}")
        for dst, src in zip(self.cache.keys + self.cache.values, cache.keys + cache.values, strict=True):
            dst.copy_(src)
        self.cache.pad_mask.copy_(cache.pad_mask)
        assert self.cache.expert_kv is not None
        for i, (k, v) in self.policy.cross_kv(cache, self.ops).items():
            self.cache.expert_kv[i][0].copy_(k)
            self.cache.expert_kv[i][1].copy_(v)
        self.noise.copy_(noise)
        if target is None or mask is None:
            self.mask.zero_()
        else:
            self.target.copy_(target)
            self.mask.copy_(mask)
        d = 0 if prefix is None else int(prefix.shape[-2])
        if prefix is not None:
            self.prefix[:, :d].copy_(prefix)
        self.committed.copy_(torch.arange(self.committed.shape[0], device=self.committed.device) < d)
        self.replays += 1
        if not self.cuda or observed():
            return self._loop()
        if self.graph is None:  # captured at the first unobserved run (its buffers hold this chunk's values)
            self._capture()
        assert self.graph is not None and self.out is not None
        self.graph.replay()
        return self.out.clone()


class GraphBackend(EagerBackend):
    """Every stage as graphs: the full-frame encode per image shape, the prefill per prefix shape and layer
    segment (:class:`StaticGraph`), the denoising loop per prefix shape and setting (:class:`DenoiseGraph`)."""

    caps = Capabilities("cudagraph", expert_plans=False, vjp=False, attention_probs=False)
    max_graphs = 8  # per stage; the oldest graph is dropped (its memory freed) past it
    prefix_bucket = 16

    def __init__(self, policy: SmolVLAPolicy) -> None:
        super().__init__(policy)
        self.ops: Any = L  # the layer functions the graphs run (the compiled variant: inductor's)
        self._encode: Callable[[Tensor], Tensor] = policy.encode_pixels
        self.graphs: dict[_GraphKey, DenoiseGraph] = {}
        self.encode_graphs: dict[tuple[Any, ...], StaticGraph] = {}
        self.prefill_graphs: dict[tuple[Any, ...], StaticGraph] = {}

    def _graph(self, table: dict[tuple[Any, ...], StaticGraph], key: tuple[Any, ...], fn: Callable[..., Any],
               inputs: Sequence[Tensor]) -> StaticGraph:
        g = table.get(key)
        if g is None:
            if len(table) >= self.max_graphs:
                table.pop(next(iter(table)))
            g = table[key] = StaticGraph(fn, inputs)
        return g

    def begin_prefill(self, visual: Any, lang_tokens: Tensor, lang_mask: Tensor, state: Tensor) -> PrefixCache:
        # padded with masked tokens to a multiple of prefix_bucket: a kept-token count that moves by one (pruning's
        # coverage guard) replays the same graphs instead of capturing new ones
        return self.policy.begin_prefill(visual, lang_tokens, lang_mask, state, pad_multiple=self.prefix_bucket)

    def encode(self, pixels: Tensor) -> Tensor:
        key = (tuple(pixels.shape), pixels.dtype)
        g = self._graph(self.encode_graphs, key, self._encode, (pixels,))
        return g(pixels).clone()  # type: ignore[no-any-return]

    def prefill(self, cache: PrefixCache, start: int, stop: int) -> None:
        if start != cache.num_layers or cache.hidden is None or cache.att_2d is None:
            raise ValueError(f"prefill: the cache holds {cache.num_layers} layers, asked to start at {start}")
        layers, fused, ops = self.policy.weights.text.layers, self.policy.fused_attention, self.ops

        def run(h: Tensor, pos: Tensor, att: Tensor) -> tuple[Tensor, list[Tensor], list[Tensor]]:
            keys, values = [], []
            for i in range(start, stop):
                h, k, v, _ = ops.vlm_layer(layers[i], h, pos, att, fused=fused, want_probs=False)
                keys.append(k)
                values.append(v)
            return h, keys, values

        inputs = (cache.hidden, cache.position_ids, cache.att_2d)
        key = (start, stop, *((tuple(x.shape), x.dtype) for x in inputs))
        h, keys, values = self._graph(self.prefill_graphs, key, run, inputs)(*inputs)
        cache.keys.extend(k.clone() for k in keys)      # the cache outlives the next replay (early exit reuses it)
        cache.values.extend(v.clone() for v in values)
        cache.hidden = h.clone()

    def integrate(self, cache: PrefixCache, noise: Tensor, num_steps: int, rtc: RTCConfig,
                  target: Tensor | None = None, mask: Tensor | None = None, prefix: Tensor | None = None) -> Tensor:
        """The runner's denoising on this backend: the same integrator, guidance and committed prefix, replayed."""
        key = _GraphKey(cache.length, num_steps, float(rtc.max_guidance_weight))
        graph = self.graphs.get(key)
        if graph is None or not graph.fits(cache):
            if len(self.graphs) >= self.max_graphs:
                self.graphs.pop(next(iter(self.graphs)))
            graph = self.graphs[key] = DenoiseGraph(self.policy, cache, num_steps, key.beta, self.ops)
        return graph.run(cache, noise.to(self.policy.device), target, mask, prefix)


class CompiledGraphBackend(GraphBackend):
    """The graphs of :class:`GraphBackend` over inductor-compiled layer functions (those of the ``compiled``
    backend: :class:`~effvla_ros.core.backends.compiled.CompiledBackend`), as TensorRT-LLM and realtime-vla pair
    fused kernels with graph replay: the graph removes the launch overhead, compilation the launches
    themselves (each layer's dozens of elementwise kernels - norms, rotary, softmax, residuals - fused into a
    few). Compilation happens at the warm-up runs before each capture (on a CPU: at the first call);
    inductor's cache on disk makes a restart's compile a lookup."""

    caps = Capabilities("cudagraph_compiled", expert_plans=False, vjp=False, attention_probs=False)

    def __init__(self, policy: SmolVLAPolicy) -> None:
        from .compiled import CompiledBackend

        super().__init__(policy)
        compiled = CompiledBackend(policy)
        self.ops = compiled.ops
        self._encode = compiled.encode
