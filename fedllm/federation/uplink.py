"""The client side of the wire: what a client does to its update before it leaves the device.

In order (each step only when the recipe asks for it):

1. a simulated attack (sign flip, scaling, noise; label flips happen in training instead);
2. SCAFFOLD's new control cᵢ⁺ from the update (sent beside it);
3. client-level DP: clip to C and add N(0, σ²C²/K) (``privacy.dp: client``), or, under secure
   aggregation with server-side DP, only the clip (the server cannot clip what it cannot see);
4. lossy compression with error feedback (over the mask's surviving values when pruned);
5. secure-aggregation masking (the server then holds only masked tensors and their sum).

:class:`Uplink` holds the per-client state these steps need (error-feedback residuals, the codec's
RNG) and checkpoints it. In-process every step runs here; engines that run clients elsewhere run
the same object there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from fedllm.algorithms.attacks import attack_update
from fedllm.algorithms.drift import ScaffoldState, scaffold_client_control
from fedllm.algorithms.privacy import DPAggregator
from fedllm.algorithms.prune import masked_values, unmask_values
from fedllm.algorithms.secure import SecAggRound
from fedllm.config import Recipe
from fedllm.federation import build
from fedllm.types import ClientUpdate, StateDict, serialized_bytes


@dataclass(frozen=True)
class Sent:
    """What one client put on the wire for one round."""

    update: ClientUpdate              # as the server decodes it (delta {} under secure aggregation)
    bytes_up: int                     # every byte this client sent (update, control, masked tensors)
    control: StateDict | None = None  # SCAFFOLD's cᵢ⁺
    masked: StateDict | None = None   # the secure-aggregation masked input


class Uplink:
    """Attack simulation, SCAFFOLD control, client DP, compression and masking for one recipe."""

    def __init__(self, recipe: Recipe, num_clients: int, payload_bytes: Callable[[Mapping[str, torch.Tensor]], int],
                 mask: Mapping[str, torch.Tensor] | None, dp: DPAggregator | None) -> None:
        self.recipe = recipe
        self.payload_bytes = payload_bytes
        self.mask = dict(mask) if mask else None
        self.dp = dp
        self.attack, self.attackers = build.attack(recipe, num_clients)
        self.codec, self.feedback = build.codec(recipe)

    def send(self, rnd: int, update: ClientUpdate, scaffold: ScaffoldState | None = None,
             secagg: SecAggRound | None = None) -> Sent:
        """Transform ``update`` (already structure-checked) as the client would before sending it."""
        r, k = self.recipe, update.client_id
        if k in self.attackers and self.attack.kind != "label_flip":  # label flips happen in training
            update = attack_update(update, self.attack, rnd)
        control, control_bytes = None, 0
        if scaffold is not None and update.local_steps > 0:
            control = scaffold_client_control(scaffold.client_control(k), scaffold.c, update.delta,
                                              update.local_steps, r.train.lr)
            control_bytes = self.payload_bytes(control)
        delta = update.delta
        if self.dp is not None and r.privacy.dp == "client":
            gen = torch.Generator().manual_seed(r.seed * 1_000_003 + rnd * 7_919 + k)
            noised = self.dp.client_noise(delta, gen)
            frozen = r.federation.lora_aggregation == "frozen_a"  # A never moves, so no noise on it
            delta = {key: delta[key] if frozen and ".lora_A" in key else v for key, v in noised.items()}
        if secagg is not None and self.dp is not None and r.privacy.dp == "server":
            delta = self.dp.clip_before_masking(delta)
        delta, nbytes = self._encode(k, delta)
        update = dataclasses.replace(update, delta=delta, bytes_up=nbytes)
        if secagg is None:
            return Sent(update, nbytes + control_bytes, control)
        masked = secagg.masked_input(k, update.delta)
        return Sent(dataclasses.replace(update, delta={}), serialized_bytes(masked) + control_bytes, control, masked)

    def _encode(self, client_id: int, delta: StateDict) -> tuple[StateDict, int]:
        """(what the server decodes, bytes on the wire) under the recipe's codec and mask."""
        if self.recipe.compression.codec == "none":
            return delta, self.payload_bytes(delta)
        values = masked_values(delta, self.mask) if self.mask is not None else delta
        if self.feedback is not None:
            enc = self.feedback.compress(client_id, values, self.codec)
        else:
            enc = self.codec.encode(values)
        decoded = self.codec.decode(enc)
        if self.mask is not None:
            decoded = unmask_values(decoded, self.mask, delta)
        return {k: v.to(delta[k].dtype) for k, v in decoded.items()}, enc.nbytes

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.feedback is not None:
            out["feedback"] = self.feedback.state_dict()
        if hasattr(self.codec, "state_dict"):
            out["codec"] = self.codec.state_dict()
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "feedback" in state and self.feedback is not None:
            self.feedback.load_state_dict(state["feedback"])
        if "codec" in state and hasattr(self.codec, "load_state_dict"):
            self.codec.load_state_dict(state["codec"])
