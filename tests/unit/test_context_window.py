"""The context engine's pure core: messages from payloads, windows per mode, trimming, governance,
size limits, how memory ids are bound to tenants; and which failed calls the client moves to
another replica."""

from __future__ import annotations

import json

import pytest

from cordum.context import window
from cordum.context.client import DRAINING, fails_over
from cordum.context.window import BadRequest, MemoryView, Message, Payload, Refused
from cordum.infra.grpc import RpcError
from cordum.store import keys
from cordum.v1 import context_pb2 as pb


def event(role: str, content: str) -> str:
    return json.dumps({"role": role, "content": content, "ts": 1})


def chunk(path: str, content: str) -> str:
    return json.dumps({"path": path, "language": "python", "bytes": len(content), "loc": 1, "content": content})


def payload(**fields: object) -> bytes:
    return json.dumps(fields).encode()


# ---- the user message ----------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "expected"), [
    (payload(prompt="p", message="m", instruction="i"), "p"),
    (payload(prompt="", message="m"), "m"),
    (payload(instruction="fix it", code_snippet="x = 1"), "Instruction: fix it\nCode:\nx = 1"),
    (payload(instruction="fix it"), "fix it"),
    (payload(prompt=3, other="x"), '{"prompt": 3, "other": "x"}'),
    (b"plain words", "plain words"),
    (b'["a", "list"]', '["a", "list"]'),
    (b"\xff\xfeodd", "\ufffd\ufffdodd"),
    (b"[" * 100_000, "[" * 100_000),  # nested past the parser's recursion limit: plain text
])
def test_user_message_prefers_prompt_then_message_then_instruction(raw: bytes, expected: str) -> None:
    assert window.read_payload(raw).user_message == expected


def test_the_payload_is_parsed_once_into_the_message_and_the_file_path() -> None:
    assert window.read_payload(payload(prompt="p", file_path=" src/a.py ")) == Payload("p", "src/a.py")
    assert window.read_payload(payload(file_path=3)) == Payload('{"file_path": 3}', "")
    assert window.read_payload(b"not json") == Payload("not json", "")


# ---- windows per mode ----------------------------------------------------------------------


def build(mode: int, raw: bytes, view: MemoryView, max_in: int = 8000, max_out: int = 1024) -> window.Window:
    return window.assemble(mode, window.read_payload(raw), view, max_in, max_out)


def test_raw_window_is_the_user_message_only() -> None:
    view = MemoryView(history=[event("user", "old")], summary="s", chunks=[chunk("a.py", "x")])
    built = build(window.RAW, payload(prompt="now", file_path="a.py"), view)
    assert built.messages == [Message("user", "now")]


def test_chat_window_keeps_the_last_20_events_in_order_and_skips_broken_ones() -> None:
    history = [event("user" if i % 2 == 0 else "assistant", f"turn {i}") for i in range(25)]
    history.insert(22, "not json")
    history.insert(23, json.dumps({"role": "user"}))  # no content
    built = build(window.CHAT, payload(prompt="now"), MemoryView(history=history))
    contents = [m.content for m in built.messages]
    # the last 20 raw entries hold 18 good turns (5 .. 24, minus the two broken ones among them)
    assert contents[-1] == "now" and built.messages[-1].role == "user"
    assert contents[:-1] == [f"turn {i}" for i in range(7, 25)]
    assert built.messages[0].role == "assistant"


def test_rag_window_adds_chunks_whose_path_contains_or_is_contained_in_the_file_path() -> None:
    chunks = [chunk("src/app/main.py", "MAIN"), chunk("src/app", "DIR"), chunk("other.py", "NO"), "{bad",
              chunk("src/app/main.py.bak", "BAK"), json.dumps(["not", "a", "record"])]
    view = MemoryView(history=[event("user", "before")], summary="SUMMARY", chunks=chunks)
    built = build(window.RAG, payload(prompt="why?", file_path="src/app/main.py"), view)
    assert [m.role for m in built.messages] == ["user", "system", "system", "system", "user"]
    assert [m.content for m in built.messages[1:4]] == [
        "Context from src/app:\nDIR", "Context from src/app/main.py:\nMAIN", "Context from src/app/main.py.bak:\nBAK"]
    assert all("SUMMARY" not in m.content for m in built.messages)


def test_rag_window_without_a_file_path_adds_the_summary() -> None:
    built = build(window.RAG, payload(prompt="q"), MemoryView(history=[], summary="the gist", chunks=[chunk("a", "x")]))
    assert built.messages == [Message("system", "the gist"), Message("user", "q")]


def test_reads_follow_the_mode() -> None:
    assert window.reads_for(window.RAW, Payload("x")) == (False, False, "")
    assert window.reads_for(window.CHAT, Payload("x", "a")) == (True, False, "")
    assert window.reads_for(window.RAG, Payload("x")) == (True, True, "")
    assert window.reads_for(window.RAG, Payload("x", "a.py")) == (True, False, "a.py")


def test_tokens_are_characters_over_four_and_the_oldest_messages_go_first() -> None:
    history = [event("user", "a" * 400), event("assistant", "b" * 400), event("user", "c" * 400)]
    built = build(window.CHAT, payload(prompt="d" * 40), MemoryView(history=history), max_in=215)
    # 1240 chars = 310 tokens; dropping "a" (100) leaves 210 <= 215
    assert [m.content[0] for m in built.messages] == ["b", "c", "d"]
    assert built.input_tokens == 210 and built.dropped == 1 and built.output_tokens == 1024


def test_the_user_message_stays_even_when_it_alone_is_over_budget() -> None:
    built = build(window.CHAT, payload(prompt="x" * 4000), MemoryView(history=[event("user", "old")]), max_in=10)
    assert built.messages == [Message("user", "x" * 4000)]
    assert built.input_tokens == 1000


def test_budgets_default_and_negative_ones_are_refused_by_name() -> None:
    request = pb.BuildWindowRequest(memory_id="t/m", mode=pb.CONTEXT_MODE_CHAT)
    assert window.check_window_request(request) == (window.CHAT, 8000, 1024)
    assert window.check_window_request(pb.BuildWindowRequest()) == (window.RAW, 8000, 1024)
    with pytest.raises(BadRequest, match="^max_input_tokens: must not be negative"):
        window.check_window_request(pb.BuildWindowRequest(max_input_tokens=-1))
    with pytest.raises(BadRequest, match="^max_output_tokens"):
        window.check_window_request(pb.BuildWindowRequest(max_output_tokens=-5))
    with pytest.raises(BadRequest, match="^mode: unknown context mode 7"):
        window.check_window_request(pb.BuildWindowRequest(mode=7))


@pytest.mark.parametrize("memory_id", ["a b", "a\nb", "tab\there", "x" * 513, "é" * 257])
def test_memory_ids_with_spaces_controls_or_too_long_are_refused(memory_id: str) -> None:
    assert window.memory_id_problems(memory_id)
    with pytest.raises(BadRequest, match="^memory_id: "):
        window.check_window_request(pb.BuildWindowRequest(memory_id=memory_id))
    with pytest.raises(BadRequest, match="^memory_id: "):
        window.check_update_request(pb.UpdateMemoryRequest(memory_id=memory_id))


def test_memory_id_problems_lists_each_problem_and_none_for_a_good_or_empty_id() -> None:
    assert window.memory_id_problems("acme/conv-1") == [] and window.memory_id_problems("") == []
    assert window.memory_id_problems("x" * 512) == []
    assert window.memory_id_problems("a b" * 300) == ["longer than 512 bytes",
                                                      "must not contain whitespace or control characters"]


@pytest.mark.parametrize("name", ["tenant_id", "writer_agent_id", "target_agent_id", "provenance_ref"])
def test_update_id_fields_over_512_bytes_are_refused_by_name(name: str) -> None:
    window.check_update_request(pb.UpdateMemoryRequest(memory_id="m", **{name: "x" * 512}))
    with pytest.raises(BadRequest, match=f"^{name}: longer than 512 bytes"):
        window.check_update_request(pb.UpdateMemoryRequest(memory_id="m", **{name: "x" * 513}))


def test_a_model_name_over_512_bytes_is_refused() -> None:
    with pytest.raises(BadRequest, match="^model: longer than 512 bytes"):
        window.check_window_request(pb.BuildWindowRequest(model="é" * 257))


def test_payloads_over_the_limit_are_refused_naming_the_field() -> None:
    window.check_window_request(pb.BuildWindowRequest(logical_payload=b"x" * 1024), 1024)
    with pytest.raises(BadRequest, match=r"^logical_payload: 1025 bytes, over the 1024-byte limit "
                                         r"\(CONTEXT_ENGINE_MAX_PAYLOAD_BYTES\)"):
        window.check_window_request(pb.BuildWindowRequest(logical_payload=b"x" * 1025), 1024)
    with pytest.raises(BadRequest, match="^logical_payload: "):
        window.check_update_request(pb.UpdateMemoryRequest(logical_payload=b"x" * 1025), 1024)
    with pytest.raises(BadRequest, match="^model_response: 2000 bytes"):
        window.check_update_request(pb.UpdateMemoryRequest(model_response=b"x" * 2000), 1024)
    # the default is 4 MiB
    window.check_window_request(pb.BuildWindowRequest(logical_payload=b"x" * (4 << 20)))
    with pytest.raises(BadRequest, match="^logical_payload: "):
        window.check_window_request(pb.BuildWindowRequest(logical_payload=b"x" * ((4 << 20) + 1)))


# ---- writes --------------------------------------------------------------------------------


def shared(**overrides: object) -> pb.UpdateMemoryRequest:
    fields: dict = dict(memory_id="acme/m1", mode=pb.CONTEXT_MODE_CHAT, tenant_id="acme", writer_agent_id="agent-1",
                        provenance_ref="prov-1", provenance_verified=True,
                        write_kind=pb.MEMORY_WRITE_KIND_SHARED_POLICY_STATE)
    fields.update(overrides)
    return pb.UpdateMemoryRequest(**fields)


def test_a_complete_shared_write_passes() -> None:
    window.check_governance(shared())
    window.check_governance(shared(write_kind=pb.MEMORY_WRITE_KIND_CHAT, policy_state_mutation=True))


@pytest.mark.parametrize(("overrides", "error", "field"), [
    ({"writer_agent_id": " "}, BadRequest, "writer_agent_id"),
    ({"provenance_ref": ""}, BadRequest, "provenance_ref"),
    ({"provenance_verified": False}, Refused, "provenance_verified"),
    ({"tenant_id": "", "memory_id": "m1"}, BadRequest, "tenant_id"),
    ({"tenant_id": "other"}, Refused, "tenant_id"),
    ({"target_agent_id": "other/agent-9"}, Refused, "tenant_id"),
    ({"write_kind": pb.MEMORY_WRITE_KIND_SHARED_TRUST_STATE, "writer_agent_id": ""}, BadRequest, "writer_agent_id"),
    ({"write_kind": pb.MEMORY_WRITE_KIND_SHARED_DIRECTIVE, "provenance_verified": False}, Refused, "provenance"),
    ({"write_kind": pb.MEMORY_WRITE_KIND_CHAT, "policy_state_mutation": True, "writer_agent_id": ""},
     BadRequest, "writer_agent_id"),
])
def test_shared_writes_without_writer_provenance_or_consistent_tenant_are_refused(overrides, error, field) -> None:
    with pytest.raises(error, match=f"^{field}"):
        window.check_governance(shared(**overrides))


def test_plain_writes_need_no_governance_fields_but_a_tenant_claim_must_match() -> None:
    window.check_governance(pb.UpdateMemoryRequest(memory_id="acme/m1", mode=pb.CONTEXT_MODE_CHAT))
    window.check_governance(pb.UpdateMemoryRequest(memory_id="unscoped", tenant_id="acme"))
    with pytest.raises(Refused, match="^tenant_id"):
        window.check_governance(pb.UpdateMemoryRequest(memory_id="other/m1", tenant_id="acme"))


def test_unknown_write_kind_is_a_bad_request() -> None:
    with pytest.raises(BadRequest, match="^write_kind"):
        window.check_update_request(pb.UpdateMemoryRequest(memory_id="m", write_kind=42))


def test_memory_events_are_the_user_message_and_the_answer() -> None:
    request = pb.UpdateMemoryRequest(memory_id="m", logical_payload=payload(prompt="hi", x=1),
                                     model_response="héllo".encode())
    user, answer = map(json.loads, window.memory_events(request, 1000, now=1700000000.7))
    assert user == {"role": "user", "content": "hi", "ts": 1700000000}
    assert answer == {"role": "assistant", "content": "héllo", "ts": 1700000000}


def test_an_entry_over_the_limit_is_refused_naming_its_field() -> None:
    big_answer = pb.UpdateMemoryRequest(logical_payload=b"hi", model_response=b"a" * 300)
    with pytest.raises(BadRequest, match=r"^model_response: the assistant entry is \d+ bytes, over the 256-byte limit"):
        window.memory_events(big_answer, 256)
    big_prompt = pb.UpdateMemoryRequest(logical_payload=payload(prompt="p" * 300), model_response=b"ok")
    with pytest.raises(BadRequest, match="^logical_payload: the user entry"):
        window.memory_events(big_prompt, 256)


# ---- tenant binding of memory ids ----------------------------------------------------------


def test_memory_ids_are_bound_to_their_tenant() -> None:
    assert keys.memory_scope("acme", "conv-1") == "acme/conv-1"
    assert keys.memory_scope("acme", "acme/conv-1") == "acme/conv-1"  # already scoped: unchanged
    assert keys.memory_scope("globex", "acme/conv-1") == "globex/acme/conv-1"  # never another tenant's
    assert keys.memory_scope("", "conv-1") == "conv-1" and keys.memory_scope("acme", "") == ""
    # a tenant name with a slash cannot forge another tenant's prefix
    assert keys.memory_scope("a/b", "c") == "a%2Fb/c" != keys.memory_scope("a", "b/c")
    assert keys.memory_owner("a%2Fb/c") == "a%2Fb" == keys.tenant_token("a/b")
    assert keys.memory_owner("plain") is None and keys.memory_owner("/x") is None
    assert keys.memory_events("acme/conv-1") == "mem:acme/conv-1:events"


# ---- which failures the client moves to another replica ------------------------------------

CONNECT_FAILED = [
    "[Errno 111] Connect call failed ('127.0.0.1', 50070)",
    "Multiple exceptions: [Errno 111] Connect call failed ('::1', 50070, 0, 0), "
    "[Errno 111] Connect call failed ('127.0.0.1', 50070)",
    "[Errno 111] Connection refused",
    "[Errno -2] Name or service not known",
    "[Errno -3] Temporary failure in name resolution",
]
MAYBE_SENT = ["Connection lost", "Connection closed", "ConnectionResetError", "[Errno 104] Connection reset by peer"]


@pytest.mark.parametrize("message", [DRAINING, *CONNECT_FAILED])
def test_a_write_moves_on_only_when_the_replica_did_not_take_it(message: str) -> None:
    assert fails_over(RpcError("UNAVAILABLE", message), write=True)
    assert fails_over(RpcError("UNAVAILABLE", message), write=False)


@pytest.mark.parametrize("message", MAYBE_SENT)
def test_a_write_cut_mid_call_is_not_repeated_but_a_read_is(message: str) -> None:
    assert not fails_over(RpcError("UNAVAILABLE", message), write=True)
    assert fails_over(RpcError("UNAVAILABLE", message), write=False)


def test_timeouts_store_failures_and_refusals() -> None:
    timed_out = RpcError("DEADLINE_EXCEEDED", "UpdateMemory timed out")
    assert not fails_over(timed_out, write=True) and fails_over(timed_out, write=False)
    store = RpcError("UNAVAILABLE", f"{window.STORE_UNAVAILABLE}: redis error: ConnectionError")
    assert not fails_over(store, write=True) and not fails_over(store, write=False)
    for code in ("INVALID_ARGUMENT", "PERMISSION_DENIED", "INTERNAL"):
        assert not fails_over(RpcError(code, DRAINING), write=True)
        assert not fails_over(RpcError(code, "x"), write=False)
