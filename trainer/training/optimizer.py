"""FlatAdam: the trainer's optimizer under ZeRO 0, in fp32 and bf16 (trainer/training/engine.py
hands it to DeepSpeed as a client optimizer).

Why not DeepSpeed's own ZeRO-0 path: with bf16 it wraps the client optimizer in
FP16_UnfusedOptimizer, which checks every parameter tensor for overflow with a host sync each
(67 per step on the paper model), a check bf16 does not need; its fp32 path clips with a norm
read back on the host. FlatAdam keeps one flat float32 master of every parameter and does the
step in a handful of device operators: no host sync (docs/benchmarks.md, "Step profile").
"""

from __future__ import annotations

from typing import Any

import torch


class FlatAdam(torch.optim.Adam):
    """Adam (no weight decay) with gradient clipping over ONE flat float32 master copy of all the
    model's parameters: the trainer's optimizer under ZeRO 0, in fp32 and bf16.

    The model's parameters become views of one flat buffer (float32: the master itself; bf16:
    a bf16 buffer that the master is copied into after each update), so a step is a handful of
    operators whatever the number of parameter tensors: the gradients concatenated (and cast to
    float32), the global norm and the clipping factor (torch.nn.utils.clip_grad_norm_: computed and
    applied on the device, min(1, max_norm / (norm + 1e-6)), no host sync, no overflow check),
    torch's fused Adam on the master, and for bf16 one copy back. DeepSpeed's ZeRO-0 bf16 wrapper
    spends about 1,341 operators and 67 host syncs on the same step (docs/benchmarks.md).

    Checkpoints keep the per-parameter layouts the trainer wrote before (DeepSpeed saves
    `state_dict()`): float32, torch Adam's state dict; bf16, that inside the layout of DeepSpeed's
    FP16_UnfusedOptimizer (`optimizer_state_dict`, `fp32_groups`, loss-scale fields), so runs
    resume across the change in either direction.
    """

    def __init__(self, params: Any, lr: float, clip: float) -> None:
        self.model_params = [p for p in params if p.requires_grad]
        if not self.model_params:
            raise ValueError("FlatAdam needs parameters")
        first = self.model_params[0]
        self.numels = [p.numel() for p in self.model_params]
        self.clip = clip
        with torch.no_grad():
            master = torch.cat([p.detach().reshape(-1).float() for p in self.model_params])
            self.low_precision = first.dtype != torch.float32
            # The model's parameters become views of one flat buffer: the master (float32) or its
            # low-precision copy.
            self.flat_params = master.to(first.dtype) if self.low_precision else master
            for p, view in zip(self.model_params, self.flat_params.split(self.numels)):
                p.data = view.view_as(p)
        super().__init__([master], lr=lr, fused=master.device.type in ("cpu", "cuda"))
        self.master = master

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        grads = [p.grad.reshape(-1) if p.grad is not None else p.new_zeros(p.numel()) for p in self.model_params]
        self.master.grad = torch.cat(grads).float()
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_([self.master], self.clip, foreach=True)
        result = super().step(closure)
        self.master.grad = None
        if self.low_precision:
            self.flat_params.copy_(self.master)
        return result

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.model_params:
            p.grad = None
        self.master.grad = None

    # Checkpoints: per-parameter layouts (see the class docstring).

    def _per_parameter(self) -> dict[str, Any]:
        flat = super().state_dict()
        state = flat["state"].get(0, {})
        per_param: dict[int, dict[str, Any]] = {}
        for i, (offset, numel, p) in enumerate(zip(self._offsets(), self.numels, self.model_params)):
            entry: dict[str, Any] = {}
            for key, value in state.items():
                if torch.is_tensor(value) and value.dim() == 1 and value.numel() == self.master.numel():
                    entry[key] = value[offset:offset + numel].view(p.shape).clone()
                else:
                    entry[key] = value.clone() if torch.is_tensor(value) else value
            if entry:
                per_param[i] = entry
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": list(range(len(self.model_params)))}
                  for g in flat["param_groups"]]
        return {"state": per_param, "param_groups": groups}

    def _offsets(self) -> list[int]:
        offsets, total = [], 0
        for n in self.numels:
            offsets.append(total)
            total += n
        return offsets

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        adam = self._per_parameter()
        if not self.low_precision:
            return adam
        return {"dynamic_loss_scale": False, "cur_scale": 1.0, "cur_iter": 0, "optimizer_state_dict": adam,
                "fp32_groups": [[m.view(p.shape).clone() for m, p in
                                 zip(self.master.split(self.numels), self.model_params)]]}

    def load_state_dict(self, state_dict: dict[str, Any], load_optimizer_states: bool = True) -> None:  # type: ignore[override]
        adam = state_dict.get("optimizer_state_dict", state_dict)
        with torch.no_grad():
            if "fp32_groups" in state_dict:
                masters = [t for group in state_dict["fp32_groups"] for t in group]
                self.master.copy_(torch.cat([t.reshape(-1).float().to(self.master.device) for t in masters]))
            else:  # float32: the model's parameters (loaded by DeepSpeed) are the master weights
                self.master.copy_(torch.cat([p.detach().reshape(-1).float() for p in self.model_params]))
            if self.low_precision:
                self.flat_params.copy_(self.master)
        if not load_optimizer_states:
            return
        saved = adam["state"]
        flat_state: dict[str, Any] = {}
        if saved:
            keys = next(iter(saved.values())).keys()
            for key in keys:
                values = [saved[i][key] for i in sorted(saved)]
                if torch.is_tensor(values[0]) and values[0].dim() > 0:
                    flat_state[key] = torch.cat([v.reshape(-1).float() for v in values]).to(self.master.device)
                else:  # the step count, the same for every parameter
                    flat_state[key] = values[0].clone() if torch.is_tensor(values[0]) else values[0]
        groups = [{**g, "params": [0]} for g in adam["param_groups"]]
        super().load_state_dict({"state": {0: flat_state} if flat_state else {}, "param_groups": groups})

    def refresh_fp32_params(self) -> None:
        """DeepSpeed calls this after loading the module only: the masters from the weights."""
        with torch.no_grad():
            self.master.copy_(torch.cat([p.detach().reshape(-1).float() for p in self.model_params]))
