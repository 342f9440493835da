"""LeRobot's state/action normalization (NormalizerProcessorStep / UnnormalizerProcessorStep)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

MODES = ("IDENTITY", "MEAN_STD", "MIN_MAX", "QUANTILES", "QUANTILE10")


def feature_type(key: str) -> str:
    if key.startswith("observation.images.") or key == "observation.image":
        return "VISUAL"
    if key == "action":
        return "ACTION"
    return "STATE"


@dataclass
class Normalizer:
    """Per-feature statistics and modes, applied exactly like LeRobot 0.6.1.

    stats: feature key -> {"mean", "std", "min", "max", "q01", "q99", ...} tensors.
    norm_map: feature type ("STATE", "ACTION", "VISUAL") -> mode (``MODES``).
    A feature without stats passes through unchanged (as in LeRobot).
    """

    stats: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    norm_map: dict[str, str] = field(
        default_factory=lambda: {"VISUAL": "IDENTITY", "STATE": "MEAN_STD", "ACTION": "MEAN_STD"})
    eps: float = 1e-8

    def _get(self, key: str, name: str, like: Tensor) -> Tensor:
        s = self.stats[key].get(name)
        if s is None:
            raise ValueError(f"normalization of {key!r}: statistic {name!r} is missing")
        return s.to(device=like.device, dtype=like.dtype)

    def _apply(self, key: str, x: Tensor, inverse: bool) -> Tensor:
        mode = self.norm_map.get(feature_type(key), "IDENTITY")
        if mode == "IDENTITY" or key not in self.stats:
            return x
        if mode == "MEAN_STD":
            mean, std = self._get(key, "mean", x), self._get(key, "std", x)
            return x * std + mean if inverse else (x - mean) / (std + self.eps)
        lo_name, hi_name = {"MIN_MAX": ("min", "max"), "QUANTILES": ("q01", "q99"),
                            "QUANTILE10": ("q10", "q90")}[mode]
        lo, hi = self._get(key, lo_name, x), self._get(key, hi_name, x)
        denom = hi - lo
        denom = torch.where(denom == 0, torch.tensor(self.eps, device=x.device, dtype=x.dtype), denom)
        if inverse:
            return (x + 1) / 2 * denom + lo
        return 2 * (x - lo) / denom - 1

    def normalize(self, key: str, x: Tensor) -> Tensor:
        return self._apply(key, x, inverse=False)

    def unnormalize(self, key: str, x: Tensor) -> Tensor:
        return self._apply(key, x, inverse=True)

    def flat(self) -> dict[str, Tensor]:
        """``{"<feature>.<stat>": tensor}`` as in LeRobot's processor-state safetensors."""
        return {f"{k}.{s}": v.detach().cpu().contiguous() for k, d in self.stats.items() for s, v in d.items()}

    @staticmethod
    def unflat(flat: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
        out: dict[str, dict[str, Tensor]] = {}
        for name, v in flat.items():
            key, stat = name.rsplit(".", 1)
            out.setdefault(key, {})[stat] = v
        return out
