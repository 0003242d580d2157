"""The trainable state of a model: what clients and the server exchange.

For a peft model that is the LoRA factors (named as peft saves them, without the adapter name, so
payloads load with ``set_peft_model_state_dict``); for a small CNN it is every parameter. Loading a
state copies in place, so one model object per process serves every simulated client.
"""

from __future__ import annotations

import torch
from torch import nn

from fedllm.types import StateDict


class TrainableState:
    """Named view of a model's trainable parameters, with in-place get/set."""

    def __init__(self, model: nn.Module, adapter_name: str | None = "default") -> None:
        tag = f".{adapter_name}." if adapter_name else None
        self.params: dict[str, nn.Parameter] = {}
        for name, p in model.named_parameters():
            if p.requires_grad:
                wire = name.replace(tag, ".") if tag else name
                if wire.endswith(".lora_magnitude_vector.weight"):  # DoRA: peft saves it without ".weight"
                    wire = wire.removesuffix(".weight")
                self.params[wire] = p
        if not self.params:
            raise ValueError("the model has no trainable parameters")

    def keys(self) -> list[str]:
        return list(self.params)

    def get(self) -> StateDict:
        """A detached CPU copy of the current trainable state."""
        return {k: p.detach().to("cpu", copy=True) for k, p in self.params.items()}

    @torch.no_grad()
    def set(self, state: StateDict) -> None:
        """Copy ``state`` into the model's parameters (keys and shapes must match)."""
        if state.keys() != self.params.keys():
            missing = sorted(set(self.params) - set(state))[:3]
            raise KeyError(f"state does not match the model's trainable parameters; missing {missing}")
        for k, p in self.params.items():
            p.copy_(state[k].to(p.device, p.dtype))

    def parameters(self) -> list[nn.Parameter]:
        return list(self.params.values())
