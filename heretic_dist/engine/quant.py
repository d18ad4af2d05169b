"""bitsandbytes 4-bit helpers: correct dequantization on CPUs where bnb repacks weights."""

from __future__ import annotations

import torch


def dequantize_4bit(weight: torch.Tensor, quant_state) -> torch.Tensor:
    """Dequantize a Params4bit weight, undoing bnb's AVX512-BF16 CPU repacking first if it happened.

    After the repacking (quant_state.packing_format_for_cpu), bnb's dequantize_4bit silently returns
    wrong values (ENVIRONMENT.md); loading disables the repacking, this guards the rest.
    """
    import bitsandbytes.functional as bnbf

    data = weight.data
    if getattr(quant_state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        data, quant_state = _convert_weight_packed_for_cpu_inverse(data, quant_state)
    return bnbf.dequantize_4bit(data, quant_state)
