"""Helpers the Triton kernels share (not an op): the accumulation dtype, float64 scalars as float32
pairs, and, for the row-wise softmax kernels (``kd_loss``, ``task_cross_entropy``,
``multitask_heads``), the chunked online-softmax update, its -inf stand-in and the row tiles."""
import math
import struct
from typing import Tuple

import torch
import triton
import triton.language as tl

# Finite stand-in for -inf as the initial running max: exp(m_old - m_new) never sees
# (-inf) - (-inf) = NaN when a whole chunk of a row is -inf (masked classes) or padding.
NEG_BIG = tl.constexpr(-3.0e38)

# Elements per program when several short rows share one program.
ROW_TILE = 2048


@triton.jit
def online_softmax_update(m, z, x):
    """Fold a [BLOCK_R, BLOCK_C] chunk x into the running max m and z = sum exp(. - m) of each row;
    returns the new (m, z)."""
    m_new = tl.maximum(m, tl.max(x, 1))
    z = z * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), 1)
    return m_new, z


def acc_dtypes(dtype: torch.dtype):
    """(torch dtype, tl dtype) to accumulate in: float64 for float64 inputs, else float32."""
    return (torch.float64, tl.float64) if dtype == torch.float64 else (torch.float32, tl.float32)


def _to_f32(value: float) -> float:
    try:
        return struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:  # beyond float32's range: rounds to infinity
        return math.copysign(math.inf, value)


def split_f64(value: float) -> Tuple[float, float]:
    """value ~= hi + lo (to ~48 bits) with both parts exactly representable in float32: scalar kernel
    arguments are float32, and float64 rows need their coefficients to float64 precision. A value
    beyond float32's range gives (+-inf, 0), never a NaN part."""
    hi = _to_f32(value)
    if not math.isfinite(hi):
        return hi, 0.0
    return hi, _to_f32(value - hi)


def row_tiles(R: int, C: int, cap: int, warps8_at: int):
    """(BLOCK_R, BLOCK_C, SINGLE_CHUNK, num_warps) for R rows of C classes, with chunks of at most cap
    classes and 8 warps from warps8_at elements per program."""
    block_c = max(4, min(triton.next_power_of_2(C), triton.next_power_of_2(cap)))
    block_r = max(1, min(ROW_TILE // block_c, triton.next_power_of_2(R)))
    num_warps = 8 if block_r * block_c >= warps8_at else 4
    return block_r, block_c, block_c >= C, num_warps
