"""Codec helper run *inside the CAP SDK's venv* (see sdk_env.py), one process per call.

    python sdk_codec.py describe   -> JSON descriptors of the SDK's CAP files
    python sdk_codec.py decode     stdin: [{"type": full_name, "b64": ...}] -> [MessageToDict]
    python sdk_codec.py encode     stdin: [{"type": full_name, "dict": {...}}] -> [{"type", "b64"}]
    python sdk_codec.py validate   stdin: [b64 BusPacket] -> [[error, ...]] per the SDK's
                                   cap.validate.validate_bus_packet, which SDK workers apply to
                                   every packet they receive (failures are dropped)

``describe`` prints {"messages": {full_name: {"file": ..., "fields": {name: [number, type,
label, type_name, oneof]}}}, "enums": {full_name: {value_name: number}}, "services":
{full_name: {method: [input, output, client_streaming, server_streaming]}}}; nested types and
map entries are included. Our test process imports :func:`describe_files` to dump our own
descriptors in the same shape (importing this module does not import the SDK).
"""

from __future__ import annotations

import base64
import json
import sys
from typing import Any, Iterable

CAP_MODULES = ("job", "heartbeat", "handshake", "alert", "buspacket", "safety")


def _label(field: Any) -> int:
    # protobuf 6 deprecates FieldDescriptor.label; values follow descriptor.proto
    if hasattr(field, "is_repeated"):
        return 3 if field.is_repeated else 2 if field.is_required else 1
    return field.label


def _type_name(field: Any) -> str:
    if field.message_type is not None:
        return field.message_type.full_name
    if field.enum_type is not None:
        return field.enum_type.full_name
    return ""


def _oneof(field: Any) -> str:
    oneof = field.containing_oneof
    # proto3 `optional` shows up as a synthetic oneof; we use none, the SDK neither
    return oneof.name if oneof is not None else ""


def _add_message(out: dict, msg: Any, file_name: str) -> None:
    out["messages"][msg.full_name] = {
        "file": file_name,
        "fields": {
            f.name: [f.number, f.type, _label(f), _type_name(f), _oneof(f)] for f in msg.fields
        },
    }
    for enum in msg.enum_types:
        _add_enum(out, enum)
    for nested in msg.nested_types:
        _add_message(out, nested, file_name)


def _add_enum(out: dict, enum: Any) -> None:
    out["enums"][enum.full_name] = {v.name: v.number for v in enum.values}


def describe_files(files: Iterable[Any]) -> dict:
    out: dict = {"messages": {}, "enums": {}, "services": {}}
    for fd in files:
        for msg in fd.message_types_by_name.values():
            _add_message(out, msg, fd.name)
        for enum in fd.enum_types_by_name.values():
            _add_enum(out, enum)
        for svc in fd.services_by_name.values():
            out["services"][svc.full_name] = {
                m.name: [m.input_type.full_name, m.output_type.full_name,
                         m.client_streaming, m.server_streaming]
                for m in svc.methods
            }
    return out


def _sdk_modules() -> list:
    import importlib

    import cap.pb  # noqa: F401  (puts cap/pb first on sys.path: `cordum` is now the SDK's)

    modules = [importlib.import_module(f"cordum.agent.v1.{name}_pb2") for name in CAP_MODULES]
    where = sys.modules["cordum"].__file__ or ""
    if "cap" not in where.replace("\\", "/").split("/"):
        raise SystemExit(f"`cordum` resolved to {where}, not the SDK's generated package")
    return modules


def _message_class(full_name: str) -> Any:
    from google.protobuf import descriptor_pool, message_factory

    return message_factory.GetMessageClass(
        descriptor_pool.Default().FindMessageTypeByName(full_name)
    )


def main(argv: list[str]) -> None:
    from google.protobuf import json_format

    mode = argv[1] if len(argv) > 1 else ""
    modules = _sdk_modules()
    if mode == "describe":
        result: Any = describe_files(m.DESCRIPTOR for m in modules)
    elif mode == "decode":
        result = [
            json_format.MessageToDict(
                _message_class(item["type"]).FromString(base64.b64decode(item["b64"])),
                preserving_proto_field_name=True,
            )
            for item in json.load(sys.stdin)
        ]
    elif mode == "encode":
        result = [
            {
                "type": item["type"],
                "b64": base64.b64encode(
                    json_format.ParseDict(item["dict"], _message_class(item["type"])())
                    .SerializeToString()
                ).decode(),
            }
            for item in json.load(sys.stdin)
        ]
    elif mode == "validate":
        from cap.validate import validate_bus_packet

        packet_class = _message_class("cordum.agent.v1.BusPacket")
        result = [
            [f"{e.field}: {e.message}"
             for e in validate_bus_packet(packet_class.FromString(base64.b64decode(item)))]
            for item in json.load(sys.stdin)
        ]
    else:
        raise SystemExit(f"usage: {argv[0]} describe|decode|encode|validate")
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main(sys.argv)
