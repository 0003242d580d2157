"""The Flower wire format: fedllm's typed messages as Flower records, and back, bit-exactly.

- :class:`TrainRequest` (server -> client): ``{"state": ArrayRecord, "instruction": ConfigRecord}``;
  a drift term travels by its type (a proximal term as its μ, with an ``anchor`` ArrayRecord
  when it is not the start state; a correction as a ``correction`` ArrayRecord);
- :class:`~fedllm.types.ClientUpdate` (client -> server): ``{"delta": ArrayRecord, "update":
  MetricRecord, "metrics": MetricRecord}``; under ``compression.codec`` the
  site's payload travels instead, as bytes in ``{"encoded": ConfigRecord}`` (``delta`` empty).

Each state dict (start state, anchor, correction, delta) is one Array: a safetensors blob
(:func:`pack_state`), so a message is a handful of Flower objects whatever the adapter's size.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass

import safetensors
import safetensors.torch
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedllm.algorithms.compress import Encoded
from fedllm.algorithms.drift import Correction, DriftTerm, Proximal
from fedllm.types import ClientUpdate, StateDict

STATE_ARRAY = "safetensors"  # an ArrayRecord's one Array: the whole state dict as a safetensors blob


def pack_state(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """A state dict as an ArrayRecord of one Array: the tensors as one safetensors blob, keys in order.

    One Array instead of one per tensor: Flower moves every Array (and each of its chunks) as its
    own object, one HTTP request per hop (ServerApp, SuperLink, SuperNode, ClientApp and back), so
    a 20-tensor adapter cost some 80 requests per message. safetensors keeps every dtype
    (bfloat16 included) bit-exactly and its parser never runs code.
    """
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    blob = safetensors.torch.save(tensors, metadata={"order": json.dumps(list(tensors))})
    return ArrayRecord({STATE_ARRAY: Array(dtype="uint8", shape=(len(blob),), stype=STATE_ARRAY, data=blob)})


def unpack_state(record: ArrayRecord) -> StateDict:
    """Inverse of :func:`pack_state` (bit-exact, keys in the sender's order); ``ValueError`` on anything else."""
    if list(record) != [STATE_ARRAY] or record[STATE_ARRAY].stype != STATE_ARRAY:
        raise ValueError(f"expected an ArrayRecord holding one {STATE_ARRAY!r} Array (fedllm's packed state), "
                         f"got arrays {list(record)[:5]}")
    blob = record[STATE_ARRAY].data
    try:
        tensors = safetensors.torch.load(blob)
        (size,) = struct.unpack("<Q", blob[:8])
        order = json.loads(json.loads(blob[8:8 + size])["__metadata__"]["order"])
    except (safetensors.SafetensorError, struct.error, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"the packed state is malformed ({type(e).__name__}: {e})") from None
    if not (isinstance(order, list) and all(isinstance(k, str) for k in order)) or sorted(order) != sorted(tensors):
        raise ValueError("the packed state's key order does not list exactly its tensors")
    return {k: tensors[k] for k in order}


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
        instruction = {"round": self.round, "client-id": self.client_id, "local-steps": self.steps}
        content = RecordDict({"state": pack_state(self.start)})
        if isinstance(self.drift, Proximal):
            instruction.update({"drift": "proximal", "mu": float(self.drift.mu)})
            if self.drift.anchor is not self.start:
                content["anchor"] = pack_state(self.drift.anchor)
        elif isinstance(self.drift, Correction):
            instruction["drift"] = "correction"
            content["correction"] = pack_state(self.drift.tensors)
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
        start = unpack_state(content["state"])
        kind = c.get("drift", "none")
        drift: DriftTerm | None = None
        if kind == "proximal":
            anchor = unpack_state(content["anchor"]) if "anchor" in content else start
            drift = Proximal(float(c["mu"]), anchor)
        elif kind == "correction":
            drift = Correction(unpack_state(content["correction"]))
        elif kind != "none":
            raise ValueError(f"unknown drift term {kind!r}; expected 'proximal' or 'correction'")
        return cls(round=int(c["round"]), client_id=int(c["client-id"]), start=start,
                   steps=int(c["local-steps"]), drift=drift)


def update_to_records(upd: ClientUpdate, encoded: Encoded | None = None) -> RecordDict:
    """A site's reply; ``encoded`` (the codec's payload) carries the delta when given."""
    scalars = {"client-id": upd.client_id, "num-examples": upd.num_examples, "local-steps": upd.local_steps,
               "train-loss": float(upd.train_loss), "bytes-up": upd.bytes_up,
               "grad-steps": -1 if upd.grad_steps is None else upd.grad_steps}
    content = RecordDict({"delta": pack_state(upd.delta), "update": MetricRecord(scalars),
                          "metrics": MetricRecord({k: float(v) for k, v in upd.metrics.items()})})
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


def _reported(u: Mapping, key: str, kind: type, default: object = None) -> int | float:
    """The reply's ``key`` as a number of ``kind``: an ``int`` stays an int (never a float such as
    1e20, nor a bool); a float may be any float (a loss can be NaN). ``ValueError`` names the key."""
    value = u.get(key, default)
    if type(value) is not kind and not (kind is float and type(value) is int):
        raise ValueError(f"the reply's {key}={value!r:.40}: expected {'an integer' if kind is int else 'a number'}")
    return value


def records_to_update(content: RecordDict) -> ClientUpdate:
    """A site's reply as the typed update; every count it reports must be an integer (the server's
    :func:`~fedllm.federation.screening.check_counts` then bounds it), else ``ValueError``."""
    for key in ("delta", "update"):
        if key not in content:
            raise ValueError(f"reply lacks the {key!r} record; expected fedllm's ClientUpdate records")
    u = content["update"]
    metrics = dict(content["metrics"]) if "metrics" in content else {}
    grad_steps = _reported(u, "grad-steps", int, -1)
    return ClientUpdate(client_id=_reported(u, "client-id", int), delta=unpack_state(content["delta"]),
                        num_examples=_reported(u, "num-examples", int), local_steps=_reported(u, "local-steps", int),
                        train_loss=float(_reported(u, "train-loss", float)), bytes_up=_reported(u, "bytes-up", int),
                        metrics=metrics, grad_steps=grad_steps if grad_steps >= 0 else None)
