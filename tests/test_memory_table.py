"""The memory table's figures (from the byte model) against the state a real optimizer creates."""
import pytest
import torch

import triton_adam
from triton_adam.bench import byte_model, memory_table


@pytest.mark.parametrize("mode", memory_table.MODES, ids=lambda m: m.name)
def test_held_and_moved_bytes_match_the_real_state(mode):
    numel = 4096  # whole 256-element blocks, and large enough for 8-bit moments
    p = torch.nn.Parameter(torch.randn(numel).to(mode.param_dtype))
    opt = triton_adam.AdamW([p], lr=1e-3, **mode.options)
    p.grad = torch.randn(numel).to(mode.param_dtype)
    opt.step()
    assert byte_model.held_bytes(opt, [p]) == mode.held * numel
    assert opt.state_bytes() == mode.held * numel
    assert opt.state_bytes(per_param=True) == {p: mode.held * numel}
    assert byte_model.bytes_from_optimizer_state(opt, [p]) == mode.moved * numel


def test_the_table_lists_every_mode_and_the_peers():
    text = memory_table.markdown()
    assert all(m.name in text for m in memory_table.MODES)
    assert "optimi" in text and "TransformerEngine" in text and "bitsandbytes" in text
    held = {m.name: m.held for m in memory_table.MODES}
    assert held["fp32 params (torch's AdamW)"] == 8
    assert held['bf16 + "compact", bf16 states'] == 6
    # the targets: int8 <= 2.1 B, int4 <= 1.1 B per param
    assert held['fp32 params, state_dtype="int8"'] == 2 + 8 / 256
    assert held['fp32 params, state_dtype="int4"'] == 1 + 8 / 128
    moved = {m.name: m.moved for m in memory_table.MODES}
    assert moved['bf16 params, state_dtype="int8"'] <= 11
