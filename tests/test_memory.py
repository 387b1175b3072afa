"""The memory policy's CPU-side logic (its GPU mechanisms are checked in test_gpu.py)."""
from wan_opt.memory import copy_parts
from wan_opt.tiny import build_tiny_components


def test_an_expert_is_copied_outside_the_blocks_first_then_block_by_block():
    expert = build_tiny_components(seed=0)["transformer"]
    parts = copy_parts(expert)
    assert [part for part, _ in parts] == [expert, *expert.blocks]
    outside = {name for name, _ in parts[0][1]}
    assert "patch_embedding.weight" in outside and "proj_out.weight" in outside
    assert not any(name.startswith("blocks.") for name in outside)
    for i, (_, tensors) in enumerate(parts[1:]):
        assert tensors and all(name.startswith(f"blocks.{i}.") for name, _ in tensors)
    named = dict(expert.named_parameters()) | dict(expert.named_buffers())
    assert sorted(n for _, tensors in parts for n, _ in tensors) == sorted(named)  # every tensor, once
