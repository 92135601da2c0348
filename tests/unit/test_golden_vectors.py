"""The Go implementation's own CAP wire vectors decode exactly with our classes (DESIGN §1)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from google.protobuf import json_format, unknown_fields

from cordum.agent.v1.buspacket_pb2 import BusPacket
from cordum.protocol import decode, encode


# The vectors live inside the repository (a copy of the shared testdata, README included), so a
# plain clone runs this test with nothing outside it.
GOLDEN = Path(__file__).resolve().parents[1] / "testdata" / "cap-golden"
VECTORS = sorted(GOLDEN.glob("*.bin"))


def _as_dict(msg: BusPacket) -> dict:
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


def _unknown_count(msg) -> int:
    """Unknown fields anywhere in the tree: each would be a field we fail to define."""
    count = len(unknown_fields.UnknownFieldSet(msg))
    for field, value in msg.ListFields():
        if field.message_type is None or field.message_type.GetOptions().map_entry:
            continue
        values = value if field.is_repeated else [value]
        count += sum(_unknown_count(v) for v in values)
    return count


def test_vectors_present():
    assert len(VECTORS) == 8, f"expected 8 golden vectors in {GOLDEN}"


@pytest.mark.parametrize("path", VECTORS, ids=lambda p: p.stem)
def test_golden_vector(path: Path):
    expected = json.loads(path.with_suffix(".json").read_text())
    packet = decode(path.read_bytes())
    assert _unknown_count(packet) == 0, f"{path.name} uses fields we do not define"
    assert _as_dict(packet) == expected
    # our own encoding reads back to the same values (bytes may differ: Go writes the oneof
    # after field 14, and map entries have no fixed order)
    assert _as_dict(decode(encode(packet))) == expected
