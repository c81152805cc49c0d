"""The block map behind one launch, including tensors past 2**31 elements (no allocation)."""
import numpy as np

from triton_adam._plan import BLOCK_SIZE, build_block_map


def test_block_map_covers_every_block_once():
    blocks = np.array([1, 0, 3, 2])
    block_map = build_block_map(blocks)
    assert block_map.dtype == np.int32
    assert block_map.tolist() == [[0, 0], [2, 0], [2, 1], [2, 2], [3, 0], [3, 1]]


def test_block_map_for_a_tensor_past_int32_elements():
    numel = 2**31 + 5
    blocks = -(-numel // BLOCK_SIZE)
    block_map = build_block_map(np.array([3, blocks]))
    last_tensor, last_block = block_map[-1]
    assert last_tensor == 1
    # the kernel widens the block index to int64 before multiplying
    start = np.int64(last_block) * BLOCK_SIZE
    assert start < numel <= start + BLOCK_SIZE
    assert start > 2**31 - 1
