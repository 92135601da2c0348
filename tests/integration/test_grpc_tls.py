"""The internal gRPC services over TLS and mutual TLS (SAFETY_KERNEL_TLS_*, CONTEXT_ENGINE_TLS_*),
and their message size limit: real servers and clients on loopback, certificates from a throwaway
CA (tests/certs.py)."""

from __future__ import annotations

import pytest

from cordum.agent.v1 import safety_grpc, safety_pb2
from cordum.infra.config import ConfigError
from cordum.infra.grpc import GrpcServer, RpcError, open_grpc_client
from cordum.infra.tls import GrpcTls
from cordum.safety.client import CircuitBreaker, Verdict, open_safety_client
from tests.certs import TestCA
from tests.conftest import unique
from tests.procs.demo_service import SlowKernel

REQUEST = safety_pb2.PolicyCheckRequest(job_id="j", topic="job.default")


@pytest.fixture
def pki(tmp_path):
    ca = TestCA(tmp_path)
    return ca, ca.issue("kernel", server=True), ca.issue("scheduler", server=False)


def _env(**values: object) -> dict[str, str]:
    return {f"SAFETY_KERNEL_TLS_{k.upper()}": str(v) for k, v in values.items()}


async def _serve(nursery, tls: GrpcTls, **kw) -> int:
    server = GrpcServer([(safety_grpc.SafetyKernelBase, SlowKernel())], ssl=tls.server_context(), **kw)
    return await nursery.start(server.serve, "127.0.0.1", 0)


async def _verdict(redis, port: int, tls: GrpcTls | None) -> Verdict:
    breaker = CircuitBreaker(redis, unique("cordum:test:cb"))
    async with open_safety_client([("127.0.0.1", port)], breaker, timeout=2, tls=tls) as client:
        return (await client.check(REQUEST)).verdict


async def test_the_kernel_over_tls_answers_only_clients_that_verify_it(redis, pki, tmp_path, nursery) -> None:
    ca, server, _ = pki
    port = await _serve(nursery, GrpcTls.from_env(_env(cert=server.cert, key=server.key), "SAFETY_KERNEL"))
    assert await _verdict(redis, port, GrpcTls.from_env(_env(ca=ca.cert), "SAFETY_KERNEL")) is Verdict.ALLOW
    assert await _verdict(redis, port, None) is Verdict.UNAVAILABLE  # plaintext gets no answer
    other = TestCA(tmp_path, name="someone-else")  # a CA the server is not signed by
    assert await _verdict(redis, port, GrpcTls.from_env(_env(ca=other.cert), "SAFETY_KERNEL")) is Verdict.UNAVAILABLE
    # the certificate is checked for the name dialled: a name it is not for fails, the right one passes
    wrong = GrpcTls.from_env(_env(ca=ca.cert, server_name="kernel.elsewhere"), "SAFETY_KERNEL")
    assert await _verdict(redis, port, wrong) is Verdict.UNAVAILABLE
    right = GrpcTls.from_env(_env(ca=ca.cert, server_name="localhost"), "SAFETY_KERNEL")
    assert await _verdict(redis, port, right) is Verdict.ALLOW
    nursery.cancel_scope.cancel()


async def test_mutual_tls_refuses_clients_without_a_certificate_of_its_ca(redis, pki, tmp_path, nursery) -> None:
    ca, server, client = pki
    served = GrpcTls.from_env(_env(cert=server.cert, key=server.key, client_ca=ca.cert), "SAFETY_KERNEL")
    port = await _serve(nursery, served)
    anonymous = GrpcTls.from_env(_env(ca=ca.cert), "SAFETY_KERNEL")
    assert await _verdict(redis, port, anonymous) is Verdict.UNAVAILABLE
    known = GrpcTls.from_env(_env(ca=ca.cert, client_cert=client.cert, client_key=client.key), "SAFETY_KERNEL")
    assert await _verdict(redis, port, known) is Verdict.ALLOW
    stranger = TestCA(tmp_path, name="stranger-ca").issue("intruder", server=False)
    forged = GrpcTls.from_env(_env(ca=ca.cert, client_cert=stranger.cert, client_key=stranger.key), "SAFETY_KERNEL")
    assert await _verdict(redis, port, forged) is Verdict.UNAVAILABLE
    nursery.cancel_scope.cancel()


async def test_an_oversized_request_is_refused_before_it_is_buffered(nursery) -> None:
    server = GrpcServer([(safety_grpc.SafetyKernelBase, SlowKernel())], max_message=64 * 1024)
    port = await nursery.start(server.serve, "127.0.0.1", 0)
    big = safety_pb2.PolicyCheckRequest(job_id="j", topic="job.default", input_content=b"x" * (1 << 20))
    async with open_grpc_client(safety_grpc.SafetyKernelStub, "127.0.0.1", port) as client:
        with pytest.raises(RpcError) as refused:
            await client.call("Check", big, timeout=5)
        assert refused.value.code == "RESOURCE_EXHAUSTED" and "the limit is 65536" in refused.value.message
        reply = await client.call("Check", REQUEST, timeout=5)  # the connection and server carry on
        assert reply.decision == safety_pb2.DECISION_TYPE_ALLOW
    nursery.cancel_scope.cancel()


def test_tls_settings_name_what_is_wrong(pki, tmp_path) -> None:
    ca, server, client = pki
    with pytest.raises(ConfigError, match="SAFETY_KERNEL_TLS_CERT and SAFETY_KERNEL_TLS_KEY go together"):
        GrpcTls.from_env(_env(cert=server.cert), "SAFETY_KERNEL")
    with pytest.raises(ConfigError, match="SAFETY_KERNEL_TLS_CA is invalid: no such file"):
        GrpcTls.from_env(_env(ca=tmp_path / "missing.pem"), "SAFETY_KERNEL").client_context()
    with pytest.raises(ConfigError, match="SAFETY_KERNEL_TLS_CERT/SAFETY_KERNEL_TLS_KEY are invalid"):
        GrpcTls.from_env(_env(cert=server.cert, key=client.key), "SAFETY_KERNEL").server_context()
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    with pytest.raises(ConfigError, match="SAFETY_KERNEL_TLS_CA is invalid: not a CA certificate"):
        GrpcTls.from_env(_env(ca=garbage), "SAFETY_KERNEL").client_context()
    with pytest.raises(ConfigError, match="SAFETY_KERNEL_TLS_CLIENT_CERT is invalid without SAFETY_KERNEL_TLS_CA"):
        GrpcTls.from_env(_env(client_cert=client.cert, client_key=client.key), "SAFETY_KERNEL").client_context()
    assert GrpcTls.from_env({}, "SAFETY_KERNEL").client_context() is None  # nothing set: plaintext (dev)
