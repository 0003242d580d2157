"""The client side of the wire: what a client does to its update before it leaves the device.

In order (each step only when the recipe asks for it):

1. a simulated attack (sign flip, scaling, noise; label flips happen in training instead);
2. SCAFFOLD's new control cᵢ⁺ from the update (sent beside it);
3. client-level DP: clip to C and add N(0, σ²C²/K) (``privacy.dp: client``), or, under secure
   aggregation with server-side DP, only the clip (the server cannot clip what it cannot see);
4. lossy compression with error feedback (over the mask's surviving values when pruned);
5. secure-aggregation masking, or CKKS encryption (the server then holds only masked tensors or
   ciphertexts, and their sum).

:class:`Uplink` holds the per-client state these steps need (error-feedback residuals, the codec's
RNG) and checkpoints it. In-process every step runs here. On the Flower engine steps 3 and 4 run
on the site (:meth:`Uplink.site_part`: the noise drawn from the site's own randomness, the codec's
payload what really travels), and the server's :meth:`Uplink.send` is called with ``on_site=True``
after :meth:`Uplink.decode` — the coordinator never sees the un-noised or uncompressed update.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from fedllm.algorithms.attacks import COLLUDING, attack_update
from fedllm.algorithms.compress import Codec, Encoded
from fedllm.algorithms.drift import ScaffoldState, scaffold_client_control
from fedllm.algorithms.he import Ciphertexts, HERound
from fedllm.algorithms.privacy import DPAggregator
from fedllm.algorithms.prune import masked_values, unmask_values
from fedllm.algorithms.secure import SecAggRound
from fedllm.config import Recipe
from fedllm.federation import build
from fedllm.types import ClientStates, ClientUpdate, StateDict


@dataclass(frozen=True)
class Sent:
    """What one client put on the wire for one round."""

    update: ClientUpdate              # as the server decodes it (delta {} under secure aggregation)
    bytes_up: int                     # every byte this client sent (update, control, masked tensors)
    control: StateDict | None = None  # SCAFFOLD's cᵢ⁺
    masked: StateDict | Ciphertexts | None = None   # the secure-aggregation masked input (HE: ciphertexts)


def decode_payload(codec: Codec, enc: Encoded, mask: Mapping[str, torch.Tensor] | None,
                   like: Mapping[str, torch.Tensor]) -> StateDict:
    """A codec payload as the server reads it: decoded, unmasked, in ``like``'s dtypes."""
    if enc.codec != codec.name:
        raise ValueError(f"the update was encoded with {enc.codec!r}; the recipe's compression.codec is {codec.name!r}")
    decoded = codec.decode(enc)
    if mask is not None:
        decoded = unmask_values(decoded, mask, like)
    return {k: v.to(like[k].dtype) for k, v in decoded.items()}


class Uplink:
    """Attack simulation, SCAFFOLD control, client DP, compression and masking for one recipe."""

    def __init__(self, recipe: Recipe, num_clients: int, payload_bytes: Callable[[Mapping[str, torch.Tensor]], int],
                 mask: Mapping[str, torch.Tensor] | None, dp: DPAggregator | None,
                 residuals: ClientStates | None = None) -> None:
        self.recipe = recipe
        self.payload_bytes = payload_bytes
        self.mask = dict(mask) if mask else None
        self.dp = dp
        self.attack, self.attackers = build.attack(recipe, num_clients)
        self.codec, self.feedback = build.codec(recipe, residuals)  # residuals: the server's store

    def send(self, rnd: int, update: ClientUpdate, scaffold: ScaffoldState | None = None,
             secagg: SecAggRound | HERound | None = None, on_site: bool = False,
             payload_bytes: Callable[[Mapping[str, torch.Tensor]], int] | None = None) -> Sent:
        """Transform ``update`` (already structure-checked) as the client would before sending it.

        ``on_site``: the site already noised and encoded it (:meth:`site_part`); ``update.delta``
        is what the server decoded and ``update.bytes_up`` the payload's size. ``payload_bytes``:
        this client's byte count of an uncompressed delta (e.g. only its own LoRA slots).
        """
        payload_bytes = payload_bytes or self.payload_bytes
        r, k = self.recipe, update.client_id
        # label flips happen in training; colluding attacks are built by the server from the honest updates
        if k in self.attackers and self.attack.kind not in ("label_flip", *COLLUDING):
            update = attack_update(update, self.attack, rnd)
        control, control_bytes = None, 0
        if scaffold is not None and update.local_steps > 0:
            control = scaffold_client_control(scaffold.client_control(k), scaffold.c, update.delta,
                                              update.local_steps, r.train.lr)
            control_bytes = self.payload_bytes(control)
        if on_site:
            delta, nbytes = update.delta, update.bytes_up
        else:
            delta = self.noise(rnd, k, update.delta)
            if secagg is not None and self.dp is not None and r.privacy.dp == "server":
                delta = self.dp.clip_before_masking(delta)
            enc = self.compress(rnd, k, delta)
            delta, nbytes = (delta, payload_bytes(delta)) if enc is None else (self.decode(enc, delta), enc.nbytes)
        update = dataclasses.replace(update, delta=delta, bytes_up=nbytes)
        if secagg is None:
            return Sent(update, nbytes + control_bytes, control)
        masked = secagg.masked_input(k, update.delta)  # masked tensors, or HE ciphertexts
        return Sent(dataclasses.replace(update, delta={}), secagg.bytes_up[k].masked + control_bytes, control, masked)

    def site_part(self, rnd: int, update: ClientUpdate, generator: torch.Generator) -> tuple[ClientUpdate, Encoded | None]:
        """What a site does to its update before it leaves: client DP noise, then the codec.

        Returns the update (its delta the noised one, or ``{}`` when an encoded payload carries
        it) and the payload. ``generator`` is the site's own: the server cannot know the noise.
        """
        delta = self.noise(rnd, update.client_id, update.delta, generator)
        enc = self.compress(rnd, update.client_id, delta)
        if enc is None:
            return dataclasses.replace(update, delta=delta, bytes_up=self.payload_bytes(delta)), None
        return dataclasses.replace(update, delta={}, bytes_up=enc.nbytes), enc

    def noise(self, rnd: int, client_id: int, delta: StateDict, generator: torch.Generator | None = None) -> StateDict:
        """Client-level DP (``privacy.dp: client``): clip and add this client's share of the noise."""
        r = self.recipe
        if self.dp is None or r.privacy.dp != "client":
            return delta
        gen = generator or torch.Generator().manual_seed(r.seed * 1_000_003 + rnd * 7_919 + client_id)
        noised = self.dp.client_noise(delta, gen)
        frozen = r.federation.lora_aggregation == "frozen_a"  # A never moves, so no noise on it
        return {key: delta[key] if frozen and ".lora_A" in key else v for key, v in noised.items()}

    def compress(self, rnd: int, client_id: int, delta: StateDict) -> Encoded | None:
        """The recipe's codec applied to ``delta`` (its mask's surviving values); ``None`` for none.

        A stochastic codec draws from a stream keyed by (seed, round, client), so a client's
        encoding does not depend on which clients were encoded before it, or where it runs.
        """
        if self.recipe.compression.codec == "none":
            return None
        if hasattr(self.codec, "reseed"):
            self.codec.reseed(self.recipe.seed * 1_000_033 + rnd * 104_729 + client_id)
        values = masked_values(delta, self.mask) if self.mask is not None else delta
        if self.feedback is not None:
            return self.feedback.compress(client_id, values, self.codec)
        return self.codec.encode(values)

    def decode(self, enc: Encoded, like: Mapping[str, torch.Tensor]) -> StateDict:
        """What the server reads from a payload, in ``like``'s layout and dtypes."""
        return decode_payload(self.codec, enc, self.mask, like)

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
