"""FLOP counting with ``torch.utils.flop_counter``, completed for CPU attention.

torch's counter has formulas for the CUDA scaled-dot-product-attention kernels but not for the
CPU flash kernel (``aten._scaled_dot_product_flash_attention_for_cpu``), so attention that runs
through ``F.scaled_dot_product_attention`` on a CPU (the SmolVLM vision tower, the Eventful
encoder) would count as 0 FLOPs. Importing this module registers the same formula torch uses for
the other SDPA kernels (2 FLOPs per multiply-add of Q K^T and of P V) for the CPU kernel, and for the
oneDNN packed linear of the ``packed`` backend (``mkldnn._linear_pointwise``: 2 FLOPs per multiply-add, as
torch counts ``mm``; the weight's rows are the output features).
"""
from __future__ import annotations

from typing import Any

import torch
from torch.utils import flop_counter

_registered = False


def ensure_cpu_sdpa_flops() -> None:
    global _registered
    if _registered:
        return
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None and op.default not in flop_counter.flop_registry:

        @flop_counter.register_flop_formula(op)
        def _cpu_flash_flop(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, out_shape: Any = None,
                            **kwargs: Any) -> int:
            return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)

    lin = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if lin is not None and lin.default not in flop_counter.flop_registry:

        @flop_counter.register_flop_formula(lin)
        def _packed_linear_flop(x_shape: Any, w_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
            rows = 1
            for d in x_shape[:-1]:
                rows *= d
            return 2 * rows * int(x_shape[-1]) * int(w_shape[0])

    _registered = True


ensure_cpu_sdpa_flops()
