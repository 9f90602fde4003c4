"""Per-channel quantisation to 8 bits: affine uint8 and fp8 e4m3.

Everything is plain torch arithmetic on float32, one rounding per operation and no fused
multiply-add, so a GPU computes exactly the bytes the CPU reference does. (Division by a Python
scalar is avoided: CUDA turns it into a multiplication by the reciprocal and the CPU does not, which
changes the last bit. Multiplying by the float32 reciprocal explicitly is the same on both.)
"""

from __future__ import annotations

import torch

#: Largest finite float8 e4m3fn value.
FP8_MAX = 448.0
_INV_FP8_MAX = 1.0 / FP8_MAX
_INV_255 = 1.0 / 255.0


def u8_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[n, C]`` float -> (``[n, C]`` uint8 codes, ``[2, C]`` float32 (low, step)).

    Each channel maps its own [min, max] onto 0..255 with round-to-nearest-even. A constant
    channel gets step 0 and decodes to its value exactly.
    """
    xf = x.float()
    low = xf.amin(dim=0)
    high = xf.amax(dim=0)
    step = (high - low) * _INV_255
    divisor = torch.where(step > 0, step, torch.ones_like(step))
    codes = torch.round((xf - low) / divisor).clamp_(0, 255).to(torch.uint8)
    return codes, torch.stack((low, step))


def u8_dequantize(codes: torch.Tensor, params: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`u8_quantize` into ``dtype``."""
    low, step = params[0], params[1]
    return torch.mul(codes.float(), step).add_(low).to(dtype)


def fp8_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[n, C]`` float -> (``[n, C]`` fp8 e4m3 bytes as uint8, ``[C]`` float32 scales).

    Each channel is scaled so its largest magnitude lands on the largest fp8 value; the few
    outlier channels of real activations keep their own scale instead of crushing the rest.
    """
    xf = x.float()
    absmax = xf.abs().amax(dim=0)
    scale = torch.where(absmax > 0, absmax * _INV_FP8_MAX, torch.ones_like(absmax))
    # Division can land a hair above FP8_MAX, which float8 would turn into NaN: clamp first.
    scaled = (xf / scale).clamp_(-FP8_MAX, FP8_MAX)
    return scaled.to(torch.float8_e4m3fn).view(torch.uint8), scale


def fp8_dequantize(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`fp8_quantize` into ``dtype``."""
    return torch.mul(codes.view(torch.float8_e4m3fn).float(), scale).to(dtype)
