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
value captures a new graph, as does a new prefix length). Encode and prefill run as on the eager backend
(prefill graphs per exit segment are the next step). On a CPU the same loop runs over the same buffers
without capture - the fallback that the tests exercise; the capture itself runs only where CUDA is.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from effvla_ros.core.flow import euler_integrate
from effvla_ros.core.rtc import RTCConfig, guided_velocity
from effvla_ros.core.smolvla.policy import SmolVLAPolicy
from effvla_ros.core.stages import PrefixCache

from .base import Capabilities
from .eager import EagerBackend


@dataclass(frozen=True)
class _GraphKey:
    length: int
    num_steps: int
    beta: float


class DenoiseGraph:
    """One chunk's denoising loop over static buffers; captured as a CUDA graph on CUDA devices."""

    def __init__(self, policy: SmolVLAPolicy, template: PrefixCache, num_steps: int, beta: float) -> None:
        self.policy = policy
        self.num_steps = num_steps
        self.rtc = RTCConfig(enabled=True, guidance="jacobian_free", max_guidance_weight=beta)
        arch = policy.arch
        dev = policy.device
        kv = policy.cross_kv(template)
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
        if dev.type == "cuda":
            self._capture()

    def _loop(self) -> Tensor:
        cache, rtc = self.cache, self.rtc

        def velocity(x: Tensor, t: Tensor, step: int) -> Tensor:
            return self.policy.velocity(cache, x, t, step=step)

        def guide(step: int, t: float, x: Tensor, v: Tensor) -> Tensor:
            return guided_velocity(x, t, lambda xx, tt: v, self.target, self.mask, rtc, v_t=v)

        return euler_integrate(velocity, self.noise, self.num_steps, guide=guide, prefix=self.prefix,
                               prefix_mask=self.committed)

    def _capture(self) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(2):  # warm-up outside the graph (allocator, kernel selection)
                self._loop()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad():
            self.out = self._loop()

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
        for i, (k, v) in self.policy.cross_kv(cache).items():
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
        if self.graph is not None:
            self.graph.replay()
            assert self.out is not None
            return self.out.clone()
        return self._loop()


class GraphBackend(EagerBackend):
    """Eager encode and prefill; the denoising loop as one :class:`DenoiseGraph` per prefix shape and setting."""

    caps = Capabilities("cudagraph", expert_plans=False, vjp=False)
    max_graphs = 8

    def __init__(self, policy: SmolVLAPolicy) -> None:
        super().__init__(policy)
        self.graphs: dict[_GraphKey, DenoiseGraph] = {}

    def integrate(self, cache: PrefixCache, noise: Tensor, num_steps: int, rtc: RTCConfig,
                  target: Tensor | None = None, mask: Tensor | None = None, prefix: Tensor | None = None) -> Tensor:
        """The runner's denoising on this backend: the same integrator, guidance and committed prefix, replayed."""
        key = _GraphKey(cache.length, num_steps, float(rtc.max_guidance_weight))
        graph = self.graphs.get(key)
        if graph is None or not graph.fits(cache):
            if len(self.graphs) >= self.max_graphs:
                self.graphs.pop(next(iter(self.graphs)))
            graph = self.graphs[key] = DenoiseGraph(self.policy, cache, num_steps, key.beta)
        return graph.run(cache, noise.to(self.policy.device), target, mask, prefix)
