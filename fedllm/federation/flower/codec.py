"""The Flower wire format: fedllm's typed messages as Flower records, and back, bit-exactly.

- :class:`TrainRequest` (server -> client): ``{"state": ArrayRecord, "instruction": ConfigRecord}``;
  a drift term travels by its type (a proximal term as its μ, with an ``anchor`` ArrayRecord
  when it is not the start state; a correction as a ``correction`` ArrayRecord);
- :class:`~fedllm.types.ClientUpdate` (client -> server): ``{"delta": ArrayRecord, "update":
  MetricRecord, "metrics": MetricRecord, "codec": ConfigRecord}``; under ``compression.codec`` the
  site's payload travels instead, as bytes in ``{"encoded": ConfigRecord}`` (``delta`` empty).

numpy has no bfloat16: such tensors travel as their int16 bits, their keys listed in the record.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedllm.algorithms.compress import Encoded
from fedllm.algorithms.drift import Correction, DriftTerm, Proximal
from fedllm.types import ClientUpdate, StateDict

BF16_KEYS = "bfloat16-keys"  # numpy has no bfloat16: such tensors travel as their int16 bits


def pack_state(state: Mapping[str, torch.Tensor]) -> tuple[ArrayRecord, list[str]]:
    """A state dict as an ArrayRecord (keys and order kept) and the keys sent as bfloat16 bits."""
    bf16 = [k for k, v in state.items() if v.dtype == torch.bfloat16]
    arrays = {}
    for k, v in state.items():
        t = v.detach().cpu().contiguous()
        arrays[k] = Array((t.view(torch.int16) if k in bf16 else t).numpy())
    return ArrayRecord(arrays), bf16


def unpack_state(record: ArrayRecord, bf16: Iterable[str] = ()) -> StateDict:
    """Inverse of :func:`pack_state` (bit-exact)."""
    bf16 = set(bf16)
    out: StateDict = {}
    for k in record:
        t = torch.from_numpy(record[k].numpy().copy())
        out[k] = t.view(torch.bfloat16) if k in bf16 else t
    return out


@dataclass(frozen=True)
class TrainRequest:
    """What the server sends one sampled client: ``exp.fit``'s arguments, minus the data.

    ``drift`` travels by its type (:data:`fedllm.algorithms.drift.DriftTerm`): a proximal term as
    its μ (its anchor is the start state, or is sent beside it), a correction as its tensors. The
    engine never needs to know which algorithm made it.
    """

    round: int
    client_id: int
    start: StateDict
    steps: int
    drift: DriftTerm | None = None

    def to_records(self) -> RecordDict:
        arrays, bf16 = pack_state(self.start)
        instruction = {"round": self.round, "client-id": self.client_id, "local-steps": self.steps, BF16_KEYS: bf16}
        content = RecordDict({"state": arrays})
        if isinstance(self.drift, Proximal):
            instruction.update({"drift": "proximal", "mu": float(self.drift.mu)})
            if self.drift.anchor is not self.start:
                content["anchor"] = pack_state(self.drift.anchor)[0]
        elif isinstance(self.drift, Correction):
            instruction["drift"] = "correction"
            content["correction"] = pack_state(self.drift.tensors)[0]
        elif self.drift is not None:
            raise TypeError(f"cannot send a drift term of type {type(self.drift).__name__}")
        content["instruction"] = ConfigRecord(instruction)
        return content

    @classmethod
    def from_records(cls, content: RecordDict) -> TrainRequest:
        for key in ("state", "instruction"):
            if key not in content:
                raise ValueError(f"train message lacks the {key!r} record; expected fedllm's TrainRequest records")
        c = content["instruction"]
        bf16 = list(c.get(BF16_KEYS, []))
        start = unpack_state(content["state"], bf16)
        kind = c.get("drift", "none")
        drift: DriftTerm | None = None
        if kind == "proximal":
            anchor = unpack_state(content["anchor"], bf16) if "anchor" in content else start
            drift = Proximal(float(c["mu"]), anchor)
        elif kind == "correction":
            drift = Correction(unpack_state(content["correction"], bf16))
        elif kind != "none":
            raise ValueError(f"unknown drift term {kind!r}; expected 'proximal' or 'correction'")
        return cls(round=int(c["round"]), client_id=int(c["client-id"]), start=start,
                   steps=int(c["local-steps"]), drift=drift)


def update_to_records(upd: ClientUpdate, encoded: Encoded | None = None) -> RecordDict:
    """A site's reply; ``encoded`` (the codec's payload) carries the delta when given."""
    arrays, bf16 = pack_state(upd.delta)
    scalars = {"client-id": upd.client_id, "num-examples": upd.num_examples, "local-steps": upd.local_steps,
               "train-loss": float(upd.train_loss), "bytes-up": upd.bytes_up,
               "grad-steps": -1 if upd.grad_steps is None else upd.grad_steps}
    content = RecordDict({"delta": arrays, "update": MetricRecord(scalars),
                          "metrics": MetricRecord({k: float(v) for k, v in upd.metrics.items()}),
                          "codec": ConfigRecord({BF16_KEYS: bf16})})
    if encoded is not None:
        content["encoded"] = ConfigRecord({"codec": encoded.codec, "payload": encoded.payload,
                                           "shapes": json.dumps({k: list(v) for k, v in encoded.shapes.items()}),
                                           "dtypes": json.dumps(encoded.dtypes)})
    return content


def records_to_encoded(content: RecordDict) -> Encoded | None:
    """The codec payload of a site's reply, or ``None`` when it sent its delta as arrays."""
    if "encoded" not in content:
        return None
    c = content["encoded"]
    try:
        shapes = {str(k): tuple(int(n) for n in v) for k, v in json.loads(str(c["shapes"])).items()}
        dtypes = {str(k): str(v) for k, v in json.loads(str(c["dtypes"])).items()}
        payload = c["payload"]
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"the reply's encoded record is malformed ({type(e).__name__}: {e})") from None
    if not isinstance(payload, bytes):
        raise ValueError(f"the reply's encoded payload: expected bytes, got {type(payload).__name__}")
    return Encoded(str(c["codec"]), payload, shapes, dtypes)


def check_reply_size(content: RecordDict, limit: int) -> None:
    """Raise ``ValueError`` if the reply's arrays hold more than ``limit`` bytes (checked before decoding)."""
    size = sum(len(array.data) for record in content.values() if isinstance(record, ArrayRecord)
               for array in record.values())
    if "encoded" in content and isinstance(content["encoded"], ConfigRecord):
        payload = content["encoded"].get("payload", b"")
        size += len(payload) if isinstance(payload, bytes) else 0
    if size > limit:
        raise ValueError(f"the reply holds {size:,} bytes of arrays, more than the {limit:,} an update of this "
                         "model can take; not decoded")


def records_to_update(content: RecordDict) -> ClientUpdate:
    for key in ("delta", "update"):
        if key not in content:
            raise ValueError(f"reply lacks the {key!r} record; expected fedllm's ClientUpdate records")
    u = content["update"]
    bf16 = content["codec"].get(BF16_KEYS, []) if "codec" in content else []
    metrics = dict(content["metrics"]) if "metrics" in content else {}
    return ClientUpdate(client_id=int(u["client-id"]), delta=unpack_state(content["delta"], bf16),
                        num_examples=int(u["num-examples"]), local_steps=int(u["local-steps"]),
                        train_loss=float(u["train-loss"]), bytes_up=int(u["bytes-up"]), metrics=metrics,
                        grad_steps=int(u["grad-steps"]) if int(u.get("grad-steps", -1)) >= 0 else None)
