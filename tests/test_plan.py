"""The block map behind one launch, including tensors past 2**31 elements (no allocation)."""
import numpy as np
import pytest

from triton_adam._tables import build_block_map, step_block_size


def test_block_map_covers_every_block_once():
    blocks = np.array([1, 0, 3, 2])
    block_map = build_block_map(blocks)
    assert block_map.dtype == np.int32
    assert block_map.tolist() == [[0, 0], [2, 0], [2, 1], [2, 2], [3, 0], [3, 1]]


# elements per program: dense moments, quantised ones, quantised with amsgrad
@pytest.mark.parametrize("block_size", sorted({step_block_size(quant, amsgrad)
                                               for quant in (0, 1) for amsgrad in (False, True)}))
def test_block_map_for_a_tensor_past_int32_elements(block_size):
    numel = 2**31 + 5
    blocks = -(-numel // block_size)
    block_map = build_block_map(np.array([3, blocks]))
    last_tensor, last_block = block_map[-1]
    assert last_tensor == 1
    # the kernel widens the block index to int64 before multiplying
    start = np.int64(last_block) * block_size
    assert start < numel <= start + block_size
    assert start > 2**31 - 1


def _alignment_case(seed):
    """Four fp32 params; grads in one flat buffer like DDP's bucket views, the third one at an
    element (4-byte) offset, so only its 16-byte accesses would be wrong."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    sizes = [4096 + 8, 4100, 5000, 12]
    params = [torch.randn(n, generator=generator) for n in sizes]
    offsets, end = [], 0
    for i, n in enumerate(sizes):
        start = -(-end // 4) * 4 + (1 if i == 2 else 0)  # the third one element-aligned only
        offsets.append(start)
        end = start + n
    buffer = torch.randn(end, generator=generator)
    grads = [buffer[o:o + n] for o, n in zip(offsets, sizes)]
    return params, grads


def test_misaligned_grads_keep_the_others_on_16_byte_accesses():
    import pytest
    import torch

    import triton_adam
    from triton_adam._plan import interpreter_enabled

    if not interpreter_enabled():
        pytest.skip("needs the Triton interpreter (CPU) to run the kernels")
    params, grads = _alignment_case(5)
    ours = [torch.nn.Parameter(p.clone()) for p in params]
    theirs = [torch.nn.Parameter(p.clone()) for p in params]
    opt = triton_adam.AdamW(ours, lr=0.01, weight_decay=0.1, backend="triton")
    ref = torch.optim.AdamW(theirs, lr=0.01, weight_decay=0.1, fused=True)
    for step in range(3):
        if step == 2:  # the grads move to fresh (aligned) memory: one aligned range again
            grads = [g.clone() for g in grads]
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g, g.clone()
        opt.step()
        ref.step()
        (bucket,) = opt._plan.triton_buckets
        addresses = bucket.tensor_table[:, :3].numpy()
        for r in bucket.ranges:
            members = sorted(set(r.block_tensor.tolist()))
            aligned = [not (addresses[m] % 16).any() and bucket.grad_ptrs[m] % 16 == 0
                       for m in members]
            assert all(aligned) if r.aligned else not any(aligned), (step, r.aligned, members)
        flags = sorted((r.aligned, sorted(set(r.block_tensor.tolist()))) for r in bucket.ranges)
        expected = [(True, [0, 1, 2, 3])] if step == 2 else [(False, [2]), (True, [0, 1, 3])]
        assert flags == expected, (step, flags)
        assert sum(r.n_blocks for r in bucket.ranges) == bucket.n_blocks
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p, q, rtol=2e-6, atol=1e-7)


def test_clipping_over_split_ranges_matches_torch():
    """The grad norm of a bucket split into aligned and unaligned launches covers every block
    once, in the order the partials are folded: same norm and update as clip_grad_norm_ + step."""
    import pytest
    import torch

    import triton_adam
    from triton_adam._plan import interpreter_enabled

    if not interpreter_enabled():
        pytest.skip("needs the Triton interpreter (CPU) to run the kernels")
    params, grads = _alignment_case(6)
    ours = [torch.nn.Parameter(p.clone()) for p in params]
    theirs = [torch.nn.Parameter(p.clone()) for p in params]
    opt = triton_adam.AdamW(ours, lr=0.01, backend="triton", max_grad_norm=1.0,
                            skip_nonfinite=True)
    ref = torch.optim.AdamW(theirs, lr=0.01, fused=True)
    for _ in range(3):
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g, g.clone()
        opt.step()
        norm = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
        ref.step()
        assert len(opt._plan.triton_buckets[0].ranges) == 2
        torch.testing.assert_close(opt.last_grad_norm, norm, rtol=1e-6, atol=0)
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p, q, rtol=2e-6, atol=1e-7)
