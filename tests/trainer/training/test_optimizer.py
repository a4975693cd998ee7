"""Tests of trainer/training/optimizer.py: FlatAdam against torch's Adam, and its checkpoint layouts."""

from __future__ import annotations

import torch


def _tiny_module() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))


def _train(module: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int = 4, scale: float = 30.0) -> None:
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(5, 4, generator=generator)
        (scale * module(x.to(next(module.parameters()).dtype)).float().pow(2).sum()).backward()  # norms past the clip
        optimizer.step()
        optimizer.zero_grad()


def test_flat_adam_is_torch_adam_with_clipping() -> None:
    from trainer.training.optimizer import FlatAdam

    reference, flat = _tiny_module(), _tiny_module()
    adam = torch.optim.Adam(reference.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(1)
    for _ in range(4):
        x = torch.randn(5, 4, generator=generator)
        (30.0 * reference(x).pow(2).sum()).backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 2.0)
        adam.step()
        adam.zero_grad()
    optimizer = FlatAdam(flat.parameters(), lr=1e-2, clip=2.0)
    _train(flat, optimizer)
    for a, b in zip(flat.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # The module's parameters are views of the one master buffer.
    assert all(p.untyped_storage().data_ptr() == optimizer.master.untyped_storage().data_ptr()
               for p in flat.parameters())


def test_flat_adam_state_dict_keeps_torch_adams_layout_and_loads_it() -> None:
    from trainer.training.optimizer import FlatAdam

    reference = _tiny_module()
    adam = torch.optim.Adam(reference.parameters(), lr=1e-2, fused=True)
    _train(reference, adam)
    saved = adam.state_dict()  # what a ZeRO-0 fp32 checkpoint of the trainer before issue 21 holds
    module = _tiny_module()
    module.load_state_dict(reference.state_dict())
    optimizer = FlatAdam(module.parameters(), lr=1e-2, clip=0.0)
    optimizer.load_state_dict(saved)
    mine = optimizer.state_dict()
    assert mine["state"].keys() == saved["state"].keys() and len(mine["param_groups"][0]["params"]) == 4
    for index, state in saved["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(mine["state"][index][key], value, msg=f"{index} {key}")
    # Both continue the same way.
    _train(reference, adam, steps=2)
    _train(module, optimizer, steps=2)
    for a, b in zip(module.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_flat_adam_in_bf16_keeps_float32_masters_in_deepspeeds_zero0_layout() -> None:
    from trainer.training.engine import _cast_parameters
    from trainer.training.optimizer import FlatAdam

    module = _tiny_module()
    _cast_parameters(module, torch.bfloat16)
    optimizer = FlatAdam(module.parameters(), lr=1e-3, clip=2.0)
    assert optimizer.master.dtype == torch.float32 and all(p.dtype == torch.bfloat16 for p in module.parameters())
    _train(module, optimizer)
    state = optimizer.state_dict()
    # DeepSpeed's FP16_UnfusedOptimizer layout (a bf16 ZeRO-0 checkpoint before issue 21).
    assert {"dynamic_loss_scale", "cur_scale", "optimizer_state_dict", "fp32_groups"} <= set(state)
    masters = state["fp32_groups"][0]
    assert [m.shape for m in masters] == [p.shape for p in module.parameters()]
    assert all(m.dtype == torch.float32 for m in masters)
    for m, p in zip(masters, module.parameters()):
        assert torch.equal(m.to(torch.bfloat16), p)  # the module holds the masters, rounded
    # Reloaded into a fresh optimizer, the masters (not the rounded weights) come back.
    other = _tiny_module()
    _cast_parameters(other, torch.bfloat16)
    restored = FlatAdam(other.parameters(), lr=1e-3, clip=2.0)
    restored.load_state_dict(state)
    torch.testing.assert_close(restored.master, optimizer.master, rtol=0, atol=0)
    for a, b in zip(other.parameters(), module.parameters()):
        assert torch.equal(a, b)
