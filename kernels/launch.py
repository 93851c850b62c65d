"""Launch settings shared by the Triton kernels: block sizes, warps and grids, in one place.

Launchers read these at call time (``launch.BLOCK_F``, not a copied constant), so a test can
shrink a block to drive the multi-block paths on small inputs. Importing this module never
needs triton.
"""

from __future__ import annotations

BLOCK_F = 1024  # features per program in the row-tiled kernels (path_accumulate, moments, finalize)
TILE = 1024  # elements per program tile in channel_reduce
NUM_WARPS = 4


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def row_tiles(B: int, F: int) -> tuple[int, tuple[int]]:
    """(n_fblocks, grid) for a kernel whose programs each own one (row, F-block) tile of a (B, F) array;
    program id = row * n_fblocks + fblock."""
    n_fblocks = cdiv(F, BLOCK_F)
    return n_fblocks, (B * n_fblocks,)
