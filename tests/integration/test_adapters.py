"""The Redis and NATS adapters against the real servers."""

from __future__ import annotations

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from cordum.agent.v1.job_pb2 import JobResult
from cordum.infra.bus import Outgoing
from cordum.infra.config import load_settings
from cordum.infra.metrics import Metrics
from cordum.infra.redis import ResponseError, open_redis
from cordum.protocol.packets import decode, encode, new_packet
from cordum.runtime.consumer import ConsumerMetrics, PacketConsumer, Retry, serve_packets
from tests.conftest import unique


# ---- Redis ------------------------------------------------------------------------------------


async def test_pool_is_bounded_and_kept_warm(server_env, redis):
    env = {**server_env, "REDIS_POOL_SIZE": "3", "REDIS_MIN_IDLE_CONNS": "2", "CORDUM_INSTANCE_ID": unique("pool")}
    settings = load_settings(env)

    async def connections() -> int:
        clients = await redis.client_list()
        return sum(1 for c in clients if c.get("name") == f"cordum:{settings.instance_id}")

    async with open_redis(settings) as pooled:
        assert await connections() == 2  # warm before the first request
        peak = 0
        async with trio.open_nursery() as nursery:
            for _ in range(5):  # five concurrent blocking calls on a pool of three
                nursery.start_soon(pooled.execute, "BLPOP", unique("empty"), "0.5")
            await trio.sleep(0.2)
            peak = await connections()
        assert peak == 3
    assert await connections() == 0  # closed on exit


async def test_cancelled_call_leaves_the_client_usable(redis):
    with trio.move_on_after(0.1) as scope:
        await redis.execute("BLPOP", unique("nothing"), "5")
    assert scope.cancelled_caught
    await redis.set("after-cancel", "fine")
    assert await redis.get("after-cancel") == "fine"


async def test_script_survives_a_script_flush(redis):
    script = redis.script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
    key = unique("counter")
    assert await script([key], [2]) == 2
    await redis.execute("SCRIPT", "FLUSH")  # the server forgets it: NOSCRIPT → reload
    assert await script([key], [3]) == 5


async def test_pipeline_is_one_round_trip_with_errors_in_place(redis):
    before = redis.round_trips
    key = unique("k")
    results = await redis.pipeline([("SET", key, "v"), ("INCR", key), ("GET", key)])
    assert redis.round_trips == before + 1
    assert results[0] is True and results[2] == "v"
    assert "not an integer" in str(results[1])


# ---- NATS / JetStream ---------------------------------------------------------------------------


async def test_many_concurrent_publishes_share_bridge_crossings(bus):
    queue = unique("q")
    async with bus.consume("sys.job.submit", queue) as messages:
        before = bus._publisher.batches
        async with trio.open_nursery() as nursery:
            for n in range(200):
                nursery.start_soon(bus.publish, "sys.job.submit", f"{queue}-{n}".encode())
        crossings = bus._publisher.batches - before
        assert crossings < 20, crossings  # 200 publishes, a handful of crossings
        got = set()
        with trio.fail_after(10):
            while len(got) < 200:
                msg = await messages.receive()
                got.add(msg.data)
                await msg.ack()
        assert len(got) == 200


async def test_msg_id_deduplicates_within_the_window(bus):
    queue, msg_id = unique("q"), unique("jobreq")
    async with bus.consume("sys.job.submit", queue) as messages:
        errors = await bus.publish_many([Outgoing("sys.job.submit", b"first", msg_id=msg_id),
                                         Outgoing("sys.job.submit", b"again", msg_id=msg_id),
                                         Outgoing("sys.job.submit", b"other", msg_id=unique("x"))])
        assert errors == [None, None, None]
        received = []
        with trio.move_on_after(1.5):
            async for msg in messages:
                received.append(msg.data)
                await msg.ack()
        assert received == [b"first", b"other"]


async def test_nak_with_delay_redelivers_and_term_does_not(bus):
    queue = unique("q")
    async with bus.consume("sys.job.result", queue) as messages:
        await bus.publish("sys.job.result", b"retry-me")
        await bus.publish("sys.job.result", b"poison")
        seen: list[tuple[bytes, int, float]] = []
        with trio.move_on_after(3):
            async for msg in messages:
                seen.append((msg.data, msg.num_delivered, trio.current_time()))
                if msg.data == b"poison":
                    await msg.term()
                elif msg.num_delivered == 1:
                    await msg.nak(delay=0.5)
                else:
                    await msg.ack()
        retried = [s for s in seen if s[0] == b"retry-me"]
        assert [s[1] for s in retried] == [1, 2]
        assert retried[1][2] - retried[0][2] >= 0.45  # redelivered after the delay, not at once
        assert [s[1] for s in seen if s[0] == b"poison"] == [1]


async def test_skipped_messages_are_acked_where_they_arrive_and_never_reach_the_handler(bus, settings):
    queue, metrics = unique("q"), Metrics(settings.instance_id)
    seen: list[str] = []

    async def handler(packet, msg) -> None:
        seen.append(packet.job_result.job_id)

    def skip(data: bytes) -> bool:
        job_id = decode(data).job_result.job_id
        if job_id.startswith("boom"):
            raise RuntimeError("a faulty skip test")  # decides nothing: the handler gets it
        return job_id.startswith("skip")

    consumer = PacketConsumer(bus, "sys.job.result", handler, ConsumerMetrics(metrics), queue=queue, skip=skip)
    async with trio.open_nursery() as nursery:
        await nursery.start(consumer.run)
        for job_id in ("skip-1", "keep-1", "skip-2", "boom-1", "keep-2", "skip-3"):
            await bus.publish("sys.job.result", encode(new_packet(JobResult(job_id=job_id, status=5), sender_id="w")))
        await bus.publish("sys.job.result", b"\xff not a packet")  # the skip test raises: not skipped
        with trio.fail_after(15):
            while len(seen) < 3 or await bus.consumer_backlog("sys.job.result", queue) != (0, 0):
                await trio.sleep(0.05)  # all seven settled: none waits for its ack
        await consumer.stop()
    assert sorted(seen) == ["boom-1", "keep-1", "keep-2"]
    samples = {(s.name, s.labels.get("subject")): s.value
               for family in text_string_to_metric_families(metrics.exposition().decode()) for s in family.samples}
    assert samples[("cordum_bus_messages_handled_total", "sys.job.result")] == 6.0  # 3 skipped, 3 handled
    assert samples[("cordum_bus_malformed_packets_total", "sys.job.result")] == 1.0


async def test_a_consumer_that_claims_room_cannot_skip(bus):
    class Room:
        async def claim(self, most: int) -> int:
            return most

        def unclaim(self, count: int) -> None:
            pass

    with pytest.raises(ValueError, match="cannot skip"):
        async with bus.consume("sys.job.result", unique("q"), room=Room(), skip=lambda data: True):
            pass


@pytest.mark.parametrize("batch, published", [
    (8, 5),  # the rest waits in the consumer's channel
    (2, 7),  # the channel (2) is full and the pump holds a fetched batch in hand
])
async def test_unhandled_fetched_messages_go_back_on_close(bus, batch, published):
    queue = unique("q")
    async with bus.consume("sys.job.cancel", queue, batch=batch) as messages:
        for n in range(published):
            await bus.publish("sys.job.cancel", f"m{n}".encode())
        first = await messages.receive()
        await first.ack()
        await trio.sleep(0.3)  # the pump has fetched the rest
    # Another member of the group gets the others now, not after the 30 s ack wait.
    async with bus.consume("sys.job.cancel", queue) as messages:
        rest = []
        with trio.fail_after(5):
            while len(rest) < published - 1:
                msg = await messages.receive()
                rest.append(msg.data)
                await msg.ack()
    assert sorted(rest) == [f"m{n}".encode() for n in range(1, published)]


async def test_stopped_consumer_gives_back_running_and_waiting_messages(bus, settings):
    queue, counters = unique("q"), ConsumerMetrics(Metrics(settings.instance_id))
    started = trio.Event()

    async def stuck(packet, msg) -> None:
        started.set()
        async with trio.open_nursery() as nursery:  # its cancellation arrives as a group
            nursery.start_soon(trio.sleep_forever)

    def result(job_id: str) -> bytes:
        return encode(new_packet(JobResult(job_id=job_id, worker_id="w", status=5), sender_id="w"))

    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: serve_packets(
            bus, "sys.job.result", stuck, counters, queue=queue, concurrency=1, task_status=task_status))
        for job_id in ("a", "b", "c"):
            await bus.publish("sys.job.result", result(job_id))
        await started.wait()
        await trio.sleep(0.3)  # "a" is in its handler, "b" waits for a handler slot
        nursery.cancel_scope.cancel()
    seen = []
    async with bus.consume("sys.job.result", queue) as messages:
        with trio.fail_after(5):
            while len(seen) < 3:
                msg = await messages.receive()
                seen.append(decode(msg.data).job_result.job_id)
                await msg.ack()
    assert sorted(seen) == ["a", "b", "c"]


async def test_malformed_packets_are_counted_and_the_consumer_keeps_going(bus, settings):
    queue, metrics = unique("q"), Metrics(settings.instance_id)
    counters = ConsumerMetrics(metrics)
    handled: list[str] = []
    attempts: dict[str, int] = {}

    async def handler(packet, msg) -> None:
        job_id = packet.job_result.job_id
        attempts[job_id] = attempts.get(job_id, 0) + 1
        if job_id == "flaky" and attempts[job_id] == 1:
            raise Retry(0.2)
        if job_id == "broken" and attempts[job_id] == 1:
            raise RuntimeError("handler bug")
        handled.append(job_id)

    def result(job_id: str) -> bytes:
        return encode(new_packet(JobResult(job_id=job_id, worker_id="w", status=5), sender_id="w"))

    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: serve_packets(
            bus, "sys.job.result", handler, counters, queue=queue, task_status=task_status))
        await bus.publish("sys.job.result", b"\xff\x00 not protobuf")
        await bus.publish("sys.job.result", b"")
        for job_id in ("ok-1", "flaky", "broken", "ok-2"):
            await bus.publish("sys.job.result", result(job_id))
        with trio.fail_after(10):
            while sorted(handled) != ["broken", "flaky", "ok-1", "ok-2"]:
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    samples = {(s.name, s.labels.get("subject")): (s.value, s.labels.get("pod"))
               for family in text_string_to_metric_families(metrics.exposition().decode()) for s in family.samples}
    assert samples[("cordum_bus_malformed_packets_total", "sys.job.result")] == (2.0, settings.instance_id)
    assert samples[("cordum_bus_handler_errors_total", "sys.job.result")] == (1.0, settings.instance_id)
    assert attempts == {"ok-1": 1, "flaky": 2, "broken": 2, "ok-2": 1}


async def test_concurrent_commands_are_auto_pipelined(redis):
    key = unique("counter")
    before = redis.round_trips
    async with trio.open_nursery() as nursery:
        for _ in range(100):
            nursery.start_soon(redis.execute, "INCR", key)
    assert await redis.get(key) == "100"
    assert redis.round_trips - before < 20  # 100 commands, a handful of round trips
    # An error reaches only the command that caused it.
    await redis.set(key + ":text", "abc")
    with pytest.raises(ResponseError):
        await redis.execute("INCR", key + ":text")
    assert await redis.execute("GET", key) == "100"


async def test_closing_while_a_message_arrives_loses_nothing(bus):
    # The close races with a message the in-flight long-poll is receiving; whatever the timing,
    # the message reaches the next member of the group now, not after the 30 s ack wait.
    # Two messages: the second is often taken by the batch fetch that follows the first.
    queue = unique("q")
    for n in range(30):
        sent = [f"race-{n}-a".encode(), f"race-{n}-b".encode()]
        async with bus.consume("sys.job.cancel", queue) as messages:
            await trio.sleep(0.01 * (n % 5))  # the pump is waiting in its long-poll
            for data in sent:
                await bus.publish("sys.job.cancel", data)
            await trio.sleep(0.001 * (n % 7))
        got = []
        async with bus.consume("sys.job.cancel", queue) as messages:
            with trio.fail_after(5):
                while len(got) < 2:
                    msg = await messages.receive()
                    got.append(msg.data)
                    await msg.ack()
        assert sorted(got) == sent


async def test_commands_packed_in_c_round_trip_every_argument_type(redis):
    from redis.exceptions import DataError

    from cordum.infra.redis import _HiredisPacking

    assert issubclass(redis._pool.connection_class, _HiredisPacking)
    key = unique("packed")
    await redis.hset(key, mapping={"text": "ключ ✓", "int": 10**20, "float": 0.1, "bytes": b"\x00\xff"})
    assert await redis.execute("HGET", key, "text") == "ключ ✓"
    assert await redis.execute("HGET", key, "int") == "100000000000000000000"
    assert await redis.execute("HGET", key, "float") == "0.1"
    assert await redis.execute("HSTRLEN", key, "bytes") == 2
    assert await redis.execute("CONFIG GET", "maxmemory-policy")  # a two-word command name is split
    with pytest.raises(DataError):
        await redis.execute("SET", key, True)  # as redis-py refuses it
    assert await redis.execute("HLEN", key) == 4
    await redis.execute("HSET", key, "bytearray", bytearray(b"ab"))  # hiredis refuses it; redis-py packs it
    assert await redis.execute("HGET", key, "bytearray") == "ab"


async def test_a_consumer_whose_durable_vanished_backs_off_and_restores_it(bus):
    from cordum.infra.aio import aio
    from cordum.protocol import subjects as subj

    queue = unique("q")
    durable = subj.durable_name(queue, "sys.job.cancel")
    requests: list[int] = []

    async def count(msg) -> None:
        requests.append(1)

    tap = await aio(bus._nc.subscribe)(f"$JS.API.CONSUMER.MSG.NEXT.{subj.STREAM_SYS}.{durable}", cb=count)
    try:
        async with bus.consume("sys.job.cancel", queue) as messages:
            await aio(bus._js.delete_consumer)(subj.STREAM_SYS, durable)
            requests.clear()
            await trio.sleep(2.0)
            # Refused requests are retried with backoff (0.5 s, 1 s, ...), not thousands a second.
            assert len(requests) < 20
            msg = await _publish_until_one_arrives(bus, messages, b"after", within=30)  # the durable is back
            assert msg.data == b"after"
    finally:
        await aio(tap.unsubscribe)()


async def test_a_consumer_whose_durable_never_answered_puts_it_back(bus, monkeypatch):
    # The durable is missing when the first requests go out (deleted between the check and the
    # request): whether the server refuses them or never answers, the consumer puts it back.
    real = bus._ensure_consumer
    calls: list[tuple] = []

    async def skip_the_first(*args):
        calls.append(args)
        if len(calls) > 1:
            await real(*args)

    monkeypatch.setattr(bus, "_ensure_consumer", skip_the_first)
    async with bus.consume("sys.job.cancel", unique("q"), fetch_timeout=0.5) as messages:
        msg = await _publish_until_one_arrives(bus, messages, b"late", within=20)
    assert msg.data == b"late" and len(calls) >= 2


async def _publish_until_one_arrives(bus, messages, data: bytes, *, within: float):
    """Publish `data` on sys.job.cancel once a second until the consumer gets a message (a new
    durable only sees what is published after it exists); that message, acked."""
    with trio.fail_after(within):
        while True:
            await bus.publish("sys.job.cancel", data)
            with trio.move_on_after(1):
                msg = await messages.receive()
                await msg.ack()
                return msg


async def test_commands_queued_later_share_one_round_trip_in_order(redis):
    key = unique("later")
    before = redis.round_trips
    write = redis.execute_later("SET", key, "v1")
    read = redis.execute_later("GET", key)  # queued behind the write: sees it
    assert await read() == "v1" and await write() is True
    assert redis.round_trips == before + 1
    script = redis.script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
    await script([key + ":n"], [1])  # loaded
    bump, peek = script.call_later([key + ":n"], [5]), redis.execute_later("GET", key + ":n")
    assert (await bump(), await peek()) == (6, "6")


async def test_pipelines_read_replies_as_redis_py_s_own_pipeline_does(redis):
    # Our pipelines on one server skip redis-py's Pipeline object (cordum.infra.redis
    # _lean_pipeline); every reply must still come back converted as redis-py converts it.
    from cordum.infra.aio import aio

    def commands(key: str) -> list[tuple]:
        return [("HSET", key + ":h", "a", "1", "b", "2"), ("HGETALL", key + ":h"), ("SET", key, "v", "NX"),
                ("SET", key, "w", "NX"), ("ZADD", key + ":z", 1, "x", 2.5, "y"),
                ("ZRANGE", key + ":z", 0, -1, "WITHSCORES"), ("INCR", key), ("GET", key), ("exists", key),
                ("SMEMBERS", key + ":none"), ("CONFIG GET", "maxmemory-policy"), ("HGETALL", key + ":none"),
                ("EVAL", "return {1, 'two', false}", 0), ("PING",)]

    async def redis_pys(key: str) -> list:
        pipe = redis._client.pipeline(transaction=False)
        for command in commands(key):
            pipe.execute_command(*command)
        return await pipe.execute(raise_on_error=False)

    ours = await redis.pipeline(commands(unique("ours")))
    theirs = await aio(redis_pys)(unique("theirs"))
    assert [str(r) if isinstance(r, Exception) else r for r in ours] == \
        [str(r) if isinstance(r, Exception) else r for r in theirs]
    assert ours[1] == {"a": "1", "b": "2"} and ours[2] is True and ours[3] is None
    assert "not an integer" in str(ours[6]) and isinstance(ours[6], ResponseError)
    assert ours[5] == theirs[5] and ours[5][1][1] == 2.5


async def test_a_connection_that_dies_mid_pipeline_fails_that_call_only(redis):
    from cordum.infra.redis import RedisUnavailable

    key = unique("killed")
    done = failures = 0  # increments made; calls that lost their connection
    for _ in range(5):
        own = (await redis.pipeline([("CLIENT", "ID")]))[0]  # the pool hands the same one out next (LIFO)
        try:  # the server ends the connection after the KILL's reply: GET's never comes
            await redis.pipeline([("INCR", key), ("CLIENT", "KILL", "ID", own, "SKIPME", "no"), ("GET", key)])
        except RedisUnavailable:
            failures += 1
        done += 1  # the INCR ran before the kill
        assert await redis.pipeline([("INCR", key), ("GET", key)]) == [done + 1, str(done + 1)]
        done += 1
    assert failures == 5
    assert await redis.execute("GET", key) == str(done)  # nothing lost, nothing applied twice
    assert loaned(redis) == 0  # every connection went back to the pool, the broken ones too


async def test_a_pipeline_redis_does_not_answer_in_time_fails_and_frees_its_connection(redis, monkeypatch):
    import cordum.infra.redis as infra_redis

    monkeypatch.setattr(infra_redis, "OP_TIMEOUT", 0.2)
    key = unique("slow")
    started = trio.current_time()
    with pytest.raises(infra_redis.RedisUnavailable, match="did not answer 2 command"):
        await redis.pipeline([("SET", key, "1"), ("BLPOP", unique("empty"), 10)])  # a reply 10 s away
    assert trio.current_time() - started < 5  # well before the reply
    monkeypatch.setattr(infra_redis, "OP_TIMEOUT", 30.0)  # what follows is not to race 0.2 s on a loaded machine
    assert await redis.pipeline([("INCR", key), ("GET", key)]) == [2, "2"]  # the SET ran; a new connection
    assert loaned(redis) == 0


def loaned(redis) -> int:
    """Connections out of the pool, but for the one the auto-pipeline keeps between batches."""
    in_use, _, _ = redis.pool_usage()
    return in_use - (redis._held._connection is not None)


async def test_the_auto_pipeline_keeps_its_connection_and_redials_one_redis_closed(redis, monkeypatch):
    from cordum.infra.redis import _HeldConnection

    monkeypatch.setattr(_HeldConnection, "HOLD_S", 60.0)
    own = await redis.execute("CLIENT", "ID")
    assert await redis.execute("CLIENT", "ID") == own  # batch after batch on one connection
    in_use, _, _ = redis.pool_usage()
    assert in_use == 1 and loaned(redis) == 0  # out of the pool while held, and only that one
    await redis.pipeline([("CLIENT", "KILL", "ID", own)])  # from another connection of the pool
    misses = redis.pool_stats()["misses"]
    with trio.fail_after(30):  # until the closed socket reached the client's loop
        while not redis._held._connection._reader.at_eof():
            await trio.sleep(0.01)
    assert await redis.execute("PING") is True  # redialled before the batch, not failed on it
    assert await redis.execute("CLIENT", "ID") != own
    assert redis.pool_stats()["misses"] == misses + 1  # the dial is counted as the pool's are


async def test_the_auto_pipeline_gives_its_connection_back_when_idle_or_needed(server_env, monkeypatch):
    from cordum.infra.redis import _HeldConnection

    settings = load_settings({**server_env, "REDIS_POOL_SIZE": "2", "REDIS_MIN_IDLE_CONNS": "0",
                              "CORDUM_INSTANCE_ID": unique("held")})
    async with open_redis(settings) as client:
        await client.execute("PING")
        await until(lambda: client.pool_usage()[0] == 0)  # idle past the hold (5 ms): given back
        monkeypatch.setattr(_HeldConnection, "HOLD_S", 60.0)  # from here on only need gives it back
        async with trio.open_nursery() as nursery:  # the pool's other connection, taken meanwhile
            nursery.start_soon(client.execute, "BLPOP", unique("empty"), "60")
            await until(lambda: client.pool_usage()[0] == 1)
            await client.execute("PING")  # the pool is now empty: the batch gives its connection back
            await until(lambda: client.pool_usage()[0] == 1)  # only the BLPOP's (held: 2, for 60 s)
            nursery.cancel_scope.cancel()


async def until(condition, timeout: float = 30) -> None:
    """Wait until `condition()` holds (a loaded machine may take its time; never forever)."""
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.01)


async def test_a_second_sender_while_the_auto_pipeline_is_busy_uses_its_own_connection(redis, monkeypatch):
    # The batcher sends one batch at a time; only its send from a caller's own task (a shutdown)
    # can overlap a batch in flight, and must not write on the held connection meanwhile.
    import cordum.infra.redis as infra_redis
    from cordum.infra.aio import aio

    monkeypatch.setattr(infra_redis, "OP_TIMEOUT", 120.0)  # the BLPOP below outlives the default
    key = unique("second")
    ended: list[str] = []

    async def send(name: str, commands: list[tuple]) -> None:
        await aio(redis._held.run)(commands)
        ended.append(name)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send, "slow", [("BLPOP", key, "60")])  # the held connection, busy until pushed
        await until(lambda: redis._held._busy)
        with trio.fail_after(30):  # queued behind the BLPOP on one connection, it would wait 60 s
            await send("fast", [("SET", key + ":x", "1"), ("GET", key + ":x")])
        await redis.execute("RPUSH", key, "go")  # now let the slow one end
    assert ended == ["fast", "slow"]
    assert loaned(redis) == 0
