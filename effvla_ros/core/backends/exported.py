"""The manifest of an exported policy (``effvla export``): what each stage graph takes and gives, and what it
was exported from, checked before an exported backend runs anything.

An export directory holds, per stage, an ONNX model (``vision.onnx``, ``prefill_<a>_<b>.onnx`` per layer
segment [a, b), ``expert_kv.onnx``, ``velocity.onnx``), their external weight files, ``manifest.json`` and per
target a TensorRT build script. The manifest names the inputs, outputs, shapes (``"P"``: the prefix length,
dynamic), dtypes and opset of every stage, the checkpoint it came from (SHA-256 of ``model.safetensors``) and
the architecture, the normalizer statistics, where the tokenizer is, and per target the min / opt / max prefix
lengths its pruning keep ratio implies (TensorRT optimization profiles).

:func:`load_manifest` + :meth:`Manifest.check` refuse a directory that does not match the policy being run
(another checkpoint, other cameras or image size, another dtype) with the file and the field named, so that a
node never starts half-configured.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .base import CapabilityError

if TYPE_CHECKING:
    from torch import Tensor

    from effvla_ros.core.smolvla.policy import SmolVLAPolicy
    from effvla_ros.core.stages import PrefixCache, VisualTokens

MANIFEST = "manifest.json"
FORMAT = 1
# architecture fields an exported graph depends on (a checkpoint with other values cannot use it)
ARCH_FIELDS = ("image_size", "patch_size", "scale_factor", "num_vlm_layers", "n_expert_layers", "chunk_size",
               "max_action_dim", "max_state_dim", "action_dim", "state_dim", "text_hidden_size",
               "tokenizer_max_length", "pad_language_to", "cameras")


class ExportError(ValueError):
    """An export directory that cannot serve this policy; the message names the file and the field."""


@dataclass
class StageSpec:
    """One stage graph: its file, inputs and outputs as name -> [shape, dtype]; a shape entry is an int or the
    name of a dynamic axis ("P", the prefix length)."""

    file: str
    inputs: dict[str, list[Any]]
    outputs: dict[str, list[Any]]
    layers: list[int] = field(default_factory=list)  # prefill segments: the VLM layers [a, b) it runs


@dataclass
class Manifest:
    format: int
    dtype: str                          # float32 / float16 / bfloat16: the stage weights' dtype
    opset: int
    checkpoint: str                     # the checkpoint directory it was exported from
    checkpoint_sha256: str              # of its model.safetensors
    arch: dict[str, Any]                # ARCH_FIELDS
    stages: dict[str, StageSpec]
    segments: list[list[int]]           # prefill layer segments [a, b), in order
    expert_layers: list[int]            # VLM layer index of each expert layer (rows of the stacked K/V)
    cross_layers: list[int]             # those whose expert layer is cross-attention
    normalizer: dict[str, dict[str, list[float]]]
    tokenizer: dict[str, Any]           # vlm_model_name, dir (where the tokenizer files were found)
    targets: dict[str, dict[str, int]] = field(default_factory=dict)  # target -> prefix min / opt / max
    torch_version: str = ""
    export_seconds: float = 0.0

    @property
    def exit_layers(self) -> tuple[int, ...]:
        """The VLM layers after which a prefill can stop (the segment ends, the last layer excluded)."""
        return tuple(b - 1 for _, b in self.segments[:-1])

    def segments_between(self, start: int, stop: int) -> list[tuple[int, int]]:
        """The exported prefill segments that run VLM layers [start, stop), in order; ValueError unless they
        cover exactly that range (a prefill can start and stop only at segment ends)."""
        if start == stop:
            return []
        picked = [(a, b) for a, b in self.segments if b > start and a < stop]
        ends = [start] + [b for _, b in picked[:-1]]
        if not picked or any(a != e for (a, _), e in zip(picked, ends)) or picked[-1][1] != stop:
            raise ValueError(f"prefill [{start}, {stop}): not a union of the exported segments {self.segments}")
        return picked

    def write(self, out_dir: Path) -> Path:
        path = Path(out_dir) / MANIFEST
        path.write_text(json.dumps(asdict(self), indent=1) + "\n")
        return path

    def check(self, policy: SmolVLAPolicy, where: Path, *, verify_checkpoint: bool = True) -> None:
        """Raise :class:`ExportError` unless this export serves ``policy`` (same weights, architecture, dtype)."""
        f = Path(where) / MANIFEST
        arch = arch_fields(policy)
        for k, v in self.arch.items():
            if arch.get(k) != v:
                raise ExportError(f"{f}: exported for {k}={v!r}, the checkpoint has {k}={arch.get(k)!r}; "
                                  "re-export with `effvla export`")
        # the vision dtype decides (the token compressor sets only it); the prefix embedding, which stays in torch,
        # runs in the policy's VLM dtype and is cast to the export's
        vision = policy.runtime.resolved_dtypes()[0]
        if vision != self.dtype:
            raise ExportError(f"{f}: stages exported in {self.dtype}, the policy runs {vision}: set the dtype "
                              f"parameters (vision_dtype, vlm_dtype, expert_dtype) to {self.dtype} or export with "
                              f"--dtype {vision}")
        source = policy.source
        if verify_checkpoint and source is not None:
            digest = checkpoint_sha256(source)
            if digest != self.checkpoint_sha256:
                raise ExportError(f"{f}: exported from another checkpoint ({self.checkpoint}, sha256 "
                                  f"{self.checkpoint_sha256[:12]}...), not {source} (sha256 {digest[:12]}...)")
        for name, spec in self.stages.items():
            if not (Path(where) / spec.file).is_file():
                raise ExportError(f"{Path(where) / spec.file}: missing (stage {name} of {f})")


def _decode(data: Mapping[str, Any]) -> Manifest:
    stages = {k: StageSpec(**v) for k, v in data["stages"].items()}
    return Manifest(**{**data, "stages": stages})


def load_manifest(export_dir: str | Path | None) -> Manifest:
    """The manifest of ``export_dir``; :class:`ExportError` naming the file when it is missing or unreadable."""
    if not export_dir:
        raise ExportError("export_dir: empty; an exported backend needs the directory `effvla export` wrote")
    d = Path(export_dir).expanduser()
    f = d / MANIFEST
    if not f.is_file():
        raise ExportError(f"export_dir: {f} does not exist (write it with `effvla export --checkpoint CKPT --out {d}`)")
    try:
        data = json.loads(f.read_text())
        if data.get("format") != FORMAT:
            raise ExportError(f"{f}: manifest format {data.get('format')!r}, this effvla_ros reads {FORMAT}")
        return _decode(data)
    except ExportError:
        raise
    except (ValueError, TypeError, KeyError) as e:
        raise ExportError(f"{f}: not a valid effvla export manifest ({type(e).__name__}: {e})") from None


def arch_fields(policy: SmolVLAPolicy) -> dict[str, Any]:
    a = policy.arch
    out = {k: getattr(a, k) for k in ARCH_FIELDS}
    out["cameras"] = list(a.cameras)
    return out


def checkpoint_sha256(checkpoint_dir: str | Path) -> str:
    """SHA-256 of a checkpoint's ``model.safetensors`` (its weights)."""
    h = hashlib.sha256()
    with open(Path(checkpoint_dir) / "model.safetensors", "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def prefix_profile(policy: SmolVLAPolicy, keep_ratio: float, min_tokens: int = 1,
                   coverage_regions: int = 0) -> dict[str, int]:
    """min / opt / max prefix length P for a pruning keep ratio: every camera at least ``min_tokens`` kept (min),
    the ratio's count plus the coverage guard's blocks (opt), the full grid (max: no pruning, or a missing camera,
    whose grid is sent masked); language from one token to ``tokenizer_max_length``; one state token."""
    a = policy.arch
    n, cams = a.tokens_per_camera, len(a.cameras)
    lang_max = a.tokenizer_max_length
    lang_min = lang_max if a.pad_language_to == "max_length" else 1
    opt_k = min(n, max(min_tokens, round(keep_ratio * n)) + coverage_regions ** 2)
    out = {"min": cams * min(n, min_tokens) + lang_min + 1, "opt": cams * opt_k + lang_max + 1,
           "max": cams * n + lang_max + 1}
    if a.prefix_length > 0:  # the checkpoint pads every prefix to this length
        out = {k: max(v, a.prefix_length) for k, v in out.items()}
    return out


def segments_for(num_layers: int, exit_layers: Sequence[int] | str) -> list[list[int]]:
    """Prefill layer segments: "all" = one per layer (exit after any layer), "none" = one for the whole VLM, or
    the given exit layers (a segment ends after each)."""
    if exit_layers == "all":
        cuts = list(range(1, num_layers))
    elif exit_layers == "none":
        cuts = []
    else:
        layers = sorted(set(int(k) for k in exit_layers))  # type: ignore[union-attr]
        bad = [k for k in layers if not 0 <= k < num_layers - 1]
        if bad:
            raise ExportError(f"exit layers {bad}: must lie in 0..{num_layers - 2} (the VLM has {num_layers} layers)")
        cuts = [k + 1 for k in layers]
    bounds = [0, *cuts, num_layers]
    return [[a, b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


class ExportedStages:
    """What every backend running exported graphs (onnxruntime, tensorrt) shares: the partial encode is not
    exported, and the prefix is embedded by the policy in torch (token layout, language, state) before the
    exported prefill segments run."""

    name: str
    policy: SmolVLAPolicy
    manifest: Manifest

    def eventful_encoder(self) -> Any:
        raise CapabilityError(f"reuse.patch_level: not supported by the {self.name!r} backend (the partial encode is "
                              "not exported; frame-level reuse works)")

    def begin_prefill(self, visual: Mapping[str, VisualTokens | Tensor], lang_tokens: Tensor, lang_mask: Tensor,
                      state: Tensor) -> PrefixCache:
        return self.policy.begin_prefill(visual, lang_tokens, lang_mask, state)

    def _check_prefill(self, cache: PrefixCache, start: int) -> None:
        if start != cache.num_layers or cache.hidden is None or cache.att_2d is None:
            raise ValueError(f"prefill: the cache holds {cache.num_layers} layers, asked to start at {start}")
        if cache.hidden.shape[0] != 1:
            raise ValueError(f"prefill: the exported graphs take a batch of 1, got {cache.hidden.shape[0]}")
