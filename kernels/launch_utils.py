"""Launch shapes shared by the Triton kernels: block sizes, warps per program, grid limits."""

from __future__ import annotations

import functools

import torch
import triton

# CUDA caps grid dimensions y and z at 65535; kernels put rows on y and launch in slices above that.
MAX_GRID_ROWS = 65535

# Elementwise programs: 2048 elements with 8 warps is 8 per thread (two 16-byte fp32 vectors); smaller
# problems drop to 256 so a handful of rows still spreads over every SM.
ELEMENTWISE_MAX_BLOCK = 2048
ELEMENTWISE_MIN_BLOCK = 256
# Reductions: each program folds one chunk this long into a partial; a tiny kernel combines the partials.
REDUCTION_MAX_BLOCK = 4096
# Programs per SM that keep the memory system busy (several resident CTAs hide load latency).
PROGRAMS_PER_SM = 4


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def pow2_at_least(n: int, floor: int = 16) -> int:
    return max(floor, triton.next_power_of_2(max(1, n)))


def elementwise_block(n: int, rows: int, device: torch.device) -> int:
    """Elements per program for a [rows, n] elementwise kernel."""
    block = min(ELEMENTWISE_MAX_BLOCK, pow2_at_least(n))
    if device.type != "cuda":
        # The interpreter pays per program, not per element: the largest block is fastest there.
        return block
    want = PROGRAMS_PER_SM * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    while block > ELEMENTWISE_MIN_BLOCK and rows * triton.cdiv(n, block) < want:
        block //= 2
    return block


def reduction_block(n: int) -> int:
    """Elements per program (one chunk) of a per-row reduction over n elements."""
    return min(REDUCTION_MAX_BLOCK, pow2_at_least(n))


def warps_for(block: int) -> int:
    """8 elements per thread up to 8 warps: enough independent loads in flight per thread."""
    return max(1, min(8, block // 256))


def row_slices(rows: int):
    """(first row, row count) launches that respect the grid's row limit; one slice in practice."""
    for start in range(0, rows, MAX_GRID_ROWS):
        yield start, min(MAX_GRID_ROWS, rows - start)
