"""A tensor past 2**31 elements: every block, the last ones included, is updated (CUDA only)."""
import pytest
import torch

import triton_adam

NUMEL = 2**31 + 4099  # past int32, with a masked tail block


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_adamw_past_int32_elements_matches_torch_on_its_ends():
    free, _ = torch.cuda.mem_get_info()
    if free < 4 * 4 * NUMEL + 2**30:
        pytest.skip(f"needs ~{4 * 4 * NUMEL / 2**30:.0f} GiB free, {free / 2**30:.0f} GiB free")
    generator = torch.Generator(device="cuda").manual_seed(0)
    param = torch.nn.Parameter(torch.randn(NUMEL, device="cuda", generator=generator))
    param.grad = torch.randn(NUMEL, device="cuda", generator=generator)
    ends = [slice(0, 1 << 20), slice(NUMEL - (1 << 20), NUMEL), slice(2**31 - 7, 2**31 + 7)]
    copies = [torch.nn.Parameter(param.detach()[s].clone()) for s in ends]
    for copy, s in zip(copies, ends):
        copy.grad = param.grad[s].clone()
    opt = triton_adam.AdamW([param], lr=1e-2)
    ref = torch.optim.AdamW(copies, lr=1e-2, foreach=False)
    for _ in range(3):
        opt.step()
        ref.step()
    torch.cuda.synchronize()
    for copy, s in zip(copies, ends):
        torch.testing.assert_close(param.detach()[s], copy.detach(), rtol=1e-6, atol=1e-6)
