"""The gateway's memory and artifact routes (cordum/gateway/memory.py) over real HTTP, against the
real Redis: a tenant reads its own memories, jobs' inputs and results, and artifacts; another
tenant's are 404s; bad requests are 400s naming the parameter."""

from __future__ import annotations

import base64
import json
import urllib.parse

from cordum.store import keys
from tests.conftest import unique
from tests.integration.test_gateway import ACME, ALICE, VIEWER, Api, api, kernel, start_gateway

FIXTURES = (api, kernel, start_gateway)  # the gateway test module's, used here by name


def q(**params: str) -> str:
    return "/api/v1/memory?" + urllib.parse.urlencode(params)


async def test_a_tenant_reads_its_own_memories_and_no_one_elses(api: Api, redis) -> None:
    conversation = unique("conv")
    stored = keys.memory_scope("default", conversation)  # where the worker helper writes tenant default's
    events = [{"role": "user", "content": "hi", "ts": 1}, {"role": "assistant", "content": "hello", "ts": 1}]
    await redis.execute("RPUSH", keys.memory_events(stored), *map(json.dumps, events))
    await redis.execute("SET", keys.memory_summary(stored), "a greeting")
    await redis.execute("SADD", keys.memory_chunks(stored), "chunk:b", "chunk:a")

    reply = await api.call("GET", q(key=f"mem:{conversation}:events"), key=VIEWER)
    assert reply.status == 200, reply.raw
    assert reply.body == {"key": f"mem:{conversation}:events", "ptr": f"redis://mem:{conversation}:events",
                          "type": "list", "size_bytes": sum(len(json.dumps(e)) for e in events), "value": events}
    by_ptr = await api.call("GET", q(ptr=f"redis://mem:{conversation}:events"))
    assert by_ptr.status == 200 and by_ptr.body["value"] == events
    # the tenant's own prefix spelled out names the same memory
    spelled = await api.call("GET", q(key=f"mem:default/{conversation}:summary"))
    assert spelled.body["value"] == "a greeting" and spelled.body["encoding"] == "text"
    chunks = await api.call("GET", q(key=f"mem:{conversation}:chunks"))
    assert chunks.body["type"] == "set" and chunks.body["value"] == ["chunk:a", "chunk:b"]

    # another tenant: the same id, or the owner's prefix spelled out, is a memory of its own: empty
    for key in (f"mem:{conversation}:events", f"mem:default/{conversation}:events"):
        foreign = await api.call("GET", q(key=key), key=ACME)
        assert foreign.status == 404 and foreign.body["error"] == "memory not found"
    missing = await api.call("GET", q(key=f"mem:{unique('none')}:events"))
    assert missing.status == 404


async def test_job_inputs_and_results_are_read_within_the_tenant(api: Api, redis) -> None:
    submitted = await api.submit(prompt="summarise this")
    assert submitted.status == 200, submitted.raw
    job_id = submitted.body["job_id"]
    await redis.execute("SET", f"res:{job_id}", json.dumps({"summary": "short"}))

    context = await api.call("GET", q(ptr=f"redis://ctx:{job_id}"), key=VIEWER)
    assert context.status == 200 and context.body["value"]["prompt"] == "summarise this"
    assert context.body["encoding"] == "json" and context.body["type"] == "string"
    result = await api.call("GET", q(key=f"res:{job_id}"))
    assert result.body["value"] == {"summary": "short"}
    for key in (f"ctx:{job_id}", f"res:{job_id}"):
        assert (await api.call("GET", q(key=key), key=ACME)).status == 404
    bad_id = await api.call("GET", q(key="res:{slot}"))
    assert bad_id.status == 400 and bad_id.body["code"] == "invalid_job_id"


async def test_bad_memory_requests_name_the_parameter(api: Api) -> None:
    cases = {
        "/api/v1/memory": "ptr or key is required",
        q(ptr="redis://mem:a:events", key="mem:a:events"): "give ptr or key, not both",
        q(ptr="s3://bucket/x"): "ptr must be a pointer redis://<key>",
        q(key="job:meta:x"): "key: readable keys are",
        q(key="mem:a:secrets"): "key: a memory key is mem:<memory id>:events",
        q(key="mem:has space:events"): "key: the memory id must be",
    }
    for path, message in cases.items():
        reply = await api.call("GET", path)
        assert reply.status == 400 and reply.body["error"].startswith(message), (path, reply.body)
    assert (await api.call("GET", q(key="mem:a:events"), key=None)).status == 401


async def test_artifacts_upload_read_and_stay_within_their_tenant(api: Api, redis) -> None:
    content = b"report: all good\n"
    created = await api.call("POST", "/api/v1/artifacts", {
        "content_base64": base64.b64encode(content).decode(), "content_type": "text/plain",
        "labels": {"run": "nightly"}}, key=ALICE)
    assert created.status == 200, created.raw
    pointer = created.body["artifact_ptr"]
    assert pointer.startswith("redis://art:") and created.body["size_bytes"] == len(content)
    artifact_id = pointer.rsplit(":", 1)[1]
    assert 30 * 86400 - 60 < await redis.ttl(keys.artifact(artifact_id)) <= 30 * 86400  # default 30d

    for path_ptr in (pointer, f"art:{artifact_id}", artifact_id, urllib.parse.quote(pointer, safe="")):
        reply = await api.call("GET", f"/api/v1/artifacts/{path_ptr}", key=VIEWER)
        assert reply.status == 200, (path_ptr, reply.raw)
        assert reply.body["artifact_ptr"] == pointer
        assert base64.b64decode(reply.body["content_base64"]) == content
        meta = reply.body["metadata"]
        assert meta["content_type"] == "text/plain" and meta["size_bytes"] == len(content)
        assert meta["retention"] == "30d" and meta["labels"] == {"run": "nightly"}
        assert meta["created_at"].endswith("Z") and meta["expires_at"] > meta["created_at"]
    as_memory = await api.call("GET", q(ptr=pointer))
    assert as_memory.body["value"] == content.decode() and as_memory.body["type"] == "artifact"

    assert (await api.call("GET", f"/api/v1/artifacts/{pointer}", key=ACME)).status == 404
    assert (await api.call("GET", q(ptr=pointer), key=ACME)).status == 404
    assert (await api.call("GET", "/api/v1/artifacts/redis://art:" + "0" * 32)).status == 404
    assert (await api.call("GET", "/api/v1/artifacts/not-an-id")).status == 404

    kept = await api.call("POST", "/api/v1/artifacts", {"content_base64": base64.b64encode(b"\x00\xff").decode(),
                                                        "content_type": "application/octet-stream",
                                                        "retention": "permanent"})
    kept_id = kept.body["artifact_ptr"].rsplit(":", 1)[1]
    assert await redis.ttl(keys.artifact(kept_id)) == -1
    binary = await api.call("GET", q(key=f"art:{kept_id}"))
    assert binary.body["encoding"] == "base64" and base64.b64decode(binary.body["value"]) == b"\x00\xff"


async def test_bad_artifact_uploads_are_refused_by_field(api: Api) -> None:
    good = {"content_base64": base64.b64encode(b"x").decode(), "content_type": "text/plain"}
    cases = [
        ({"content_type": "text/plain"}, "content_base64 is required"),
        ({**good, "content_base64": "not base64!"}, "content_base64 is not valid base64"),
        ({**good, "content_type": " "}, "content_type is required"),
        ({**good, "retention": "soon"}, "retention: expected permanent or a duration"),
        ({**good, "retention": "4000d"}, "retention: expected permanent or a duration"),
        ({**good, "labels": {"a": 1}}, "labels must be an object of strings"),
    ]
    for body, message in cases:
        reply = await api.call("POST", "/api/v1/artifacts", body)
        assert reply.status == 400 and reply.body["error"].startswith(message), (body, reply.body)
    assert (await api.call("POST", "/api/v1/artifacts", good, key=VIEWER)).status == 403
