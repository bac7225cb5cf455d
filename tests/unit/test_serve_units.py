"""The server's pieces in isolation: the batcher (batching, bounded queue, drain) and the protocol parser."""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest

from keiryo.serve.batching import Batcher, QueueFull
from keiryo.serve.protocol import InferRequest, ProtocolError, build_response, parse_request

SPEC = {"input": {"name": "input", "datatype": "FP32", "shape": [-1, 2]}}


def _slow_double(delay: float, calls: list[int]):
    def run(feed):
        calls.append(len(feed["input"]))
        time.sleep(delay)
        return {"out": feed["input"] * 2}

    return run


def test_concurrent_requests_share_a_run_and_each_gets_its_rows():
    calls: list[int] = []

    async def main():
        b = Batcher(_slow_double(0.02, calls), max_batch_size=8, max_queue_delay_ms=5)
        b.start()
        xs = [np.full((1, 2), i, np.float32) for i in range(8)]
        outs = await asyncio.gather(*(b.submit({"input": x}) for x in xs))
        await b.drain()
        return xs, outs

    xs, outs = asyncio.run(main())
    for x, o in zip(xs, outs, strict=True):
        np.testing.assert_array_equal(o["out"], x * 2)
    assert max(calls) > 1 and sum(calls) == 8


def test_a_lone_request_does_not_wait_for_the_queue_delay():
    calls: list[int] = []

    async def main():
        b = Batcher(_slow_double(0.0, calls), max_batch_size=32, max_queue_delay_ms=500)
        b.start()
        t = time.perf_counter()
        await b.submit({"input": np.ones((1, 2), np.float32)})
        dt = time.perf_counter() - t
        await b.drain()
        return dt

    assert asyncio.run(main()) < 0.25  # not the 500 ms delay


def test_an_idle_fast_model_runs_on_the_loop_and_company_still_batches():
    """The idle fast path: once a lone run is measured under inline_below_ms, a lone request runs on the
    event loop's thread; two at once go through the queue and run together on the session thread."""
    import threading

    threads: list[str] = []
    calls: list[int] = []

    def run(feed):
        threads.append(threading.current_thread().name)
        calls.append(len(feed["input"]))
        return {"out": feed["input"] * 2}

    def slow(feed):
        time.sleep(0.01)
        return run(feed)

    async def main(fn, inline_ms):
        b = Batcher(fn, max_batch_size=8, max_queue_delay_ms=50, inline_below_ms=inline_ms)
        b.start()
        for _ in range(3):
            out = await b.submit({"input": np.ones((1, 2), np.float32)})
            np.testing.assert_array_equal(out["out"], 2)
        pair = await asyncio.gather(*(b.submit({"input": np.full((1, 2), i, np.float32)}) for i in range(2)))
        await b.drain()
        return [p["out"][0, 0] for p in pair]

    assert asyncio.run(main(run, 5.0)) == [0, 2]
    loop_thread = threading.main_thread().name
    assert threads[0].startswith("keiryo-session") and threads[1:3] == [loop_thread, loop_thread]  # measured, then inline
    assert threads[3].startswith("keiryo-session") and calls[3] == 2  # company: queued and batched
    threads.clear(), calls.clear()
    asyncio.run(main(slow, 5.0))  # a 10 ms model is never run on the loop
    assert all(t.startswith("keiryo-session") for t in threads)
    threads.clear()
    asyncio.run(main(run, 0.0))  # 0 turns the fast path off
    assert all(t.startswith("keiryo-session") for t in threads)


def _lone_then_burst(lone: int, burst: int, run_s: float) -> tuple[list[tuple[int, bool]], dict[str, int]]:
    """A lone client's ``lone`` requests, then ``burst`` concurrent calls accepted one at a time (as a gRPC
    server's accept loop does: one call per 0.1 ms, its message 0.2 ms later), on a model taking ``run_s``.
    Returns each run's (rows, whether it ran on the loop's thread) and the batcher's path counts after the
    lone client."""
    import threading

    calls: list[tuple[int, bool]] = []

    def run(feed):
        calls.append((len(feed["input"]), threading.current_thread() is threading.main_thread()))
        time.sleep(run_s)
        return {"out": feed["input"] * 2}

    async def main():
        b = Batcher(run, max_batch_size=32, max_queue_delay_ms=5, inline_below_ms=20)
        b.start()
        for _ in range(lone):
            await b.submit({"input": np.ones((1, 2), np.float32)})
        runs = dict(b.runs)

        async def call(i: int):
            await asyncio.sleep(0.0002)  # its message arrives
            out = await b.submit({"input": np.full((1, 2), i, np.float32)})
            np.testing.assert_array_equal(out["out"], 2 * i)

        tasks = []
        for i in range(burst):
            tasks.append(asyncio.create_task(call(i)))
            await asyncio.sleep(0.0001)
        await asyncio.gather(*tasks)
        await b.drain()
        return runs

    return calls, asyncio.run(main())


def test_calls_accepted_one_at_a_time_still_batch_with_the_fast_path_on():
    """Concurrent calls that reach the batcher one after another, never in the same loop turn (grpc.aio
    accepts one call per turn, then waits for its message), each find the batcher idle. Once traffic was
    serial the fast path is on, yet they must not all run alone on the loop: a probe takes the session
    thread, the others arrive meanwhile and batch, and the fast path stays off while they keep coming."""
    from keiryo.serve.batching import PROBE_EVERY

    calls, _ = _lone_then_burst(4, 64, 0.002)
    lone, burst = calls[:4], calls[4:]
    assert [on_loop for _, on_loop in lone] == [False, True, True, True]  # serial traffic: on the loop
    assert sum(on_loop for _, on_loop in burst) < PROBE_EVERY  # then at most until the probe
    assert sum(rows for rows, _ in burst) == 64 and len(burst) <= 48  # batched (each alone: 64 runs)


def test_a_lone_clients_probes_space_out_and_company_still_batches_within_probe_max():
    """Each probe that finds nobody doubles the interval to the next (up to PROBE_MAX): a lone client's requests
    take the session thread ever more rarely (each hand-off costs half a millisecond of CPU on a small virtual
    machine); concurrent calls that come after a long serial stretch still batch within PROBE_MAX requests."""
    from keiryo.serve.batching import PROBE_EVERY, PROBE_MAX

    # a 3 ms model: the burst's calls come about 1 ms apart (asyncio's epoll wait rounds sleep(0.0001) up to a
    # millisecond), so several arrive while a run is on the session thread, on any machine (0.5 ms was flaky)
    calls, lone = _lone_then_burst(600, 2 * PROBE_MAX, 0.003)
    # the first request (measured) and probes after 8, 16, 32, 64, then every 128: 8 of 600, not 600 / 8 = 75
    assert lone["queued"] <= 10 and lone["inline"] == 600 - lone["queued"]
    burst = calls[600:]
    assert sum(on_loop for _, on_loop in burst) < PROBE_MAX  # on the loop at most until the next probe
    assert sum(rows for rows, _ in burst) == 2 * PROBE_MAX and len(burst) < 2 * PROBE_MAX - PROBE_EVERY  # and batched


def test_a_request_queued_behind_a_batch_does_not_wait_for_requests_already_answered():
    """Requests whose answers are set no longer count as "on their way": the next batch starts at once."""
    calls: list[int] = []

    async def main():
        b = Batcher(_slow_double(0.05, calls), max_batch_size=32, max_queue_delay_ms=500)
        b.start()
        first = [asyncio.create_task(b.submit({"input": np.ones((1, 2), np.float32)})) for _ in range(2)]
        await asyncio.sleep(0.02)  # the first two are running
        t = time.perf_counter()
        await b.submit({"input": np.ones((1, 2), np.float32)})
        dt = time.perf_counter() - t
        await asyncio.gather(*first)
        await b.drain()
        return dt

    assert asyncio.run(main()) < 0.3  # its own run and the rest of the first: not the 500 ms delay
    assert calls == [2, 1]


def test_a_full_queue_refuses_at_once_and_drain_answers_everyone():
    calls: list[int] = []

    async def main():
        b = Batcher(_slow_double(0.05, calls), max_batch_size=1, max_queue_delay_ms=0, max_queue=2)
        b.start()
        tasks = [asyncio.create_task(b.submit({"input": np.ones((1, 2), np.float32)})) for _ in range(6)]
        results = await asyncio.gather(*tasks, return_exceptions=True)
        ok = [r for r in results if isinstance(r, dict)]
        full = [r for r in results if isinstance(r, QueueFull)]
        late = [asyncio.create_task(b.submit({"input": np.ones((1, 2), np.float32)})) for _ in range(2)]
        await asyncio.sleep(0)
        await b.drain()  # graceful shutdown: queued requests are answered before the worker stops
        return ok, full, [t.result() for t in late]

    ok, full, late = asyncio.run(main())
    assert full and ok and len(ok) + len(full) == 6
    assert len(late) == 2 and all("out" in r for r in late)


def _binary(x: np.ndarray, extra: bytes = b"", size: int | None = None) -> tuple[bytes, str]:
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": list(x.shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": size or x.nbytes},
                }
            ]
        }
    ).encode()
    return head + x.tobytes() + extra, str(len(head))


def test_binary_request_round_trip_and_errors():
    x = np.arange(6, dtype=np.float32).reshape(3, 2)
    body, n = _binary(x)
    req = parse_request(body, n, SPEC)
    np.testing.assert_array_equal(req.inputs["input"], x)
    with pytest.raises(ProtocolError, match="binary bytes that no input claims"):
        parse_request(*_binary(x, b"\0\0\0\0"), SPEC)
    with pytest.raises(ProtocolError, match="binary_data_size 4, expected 24"):
        parse_request(*_binary(x, size=4), SPEC)
    with pytest.raises(ProtocolError, match="does not fit a body"):
        parse_request(body, "99999", SPEC)
    with pytest.raises(ProtocolError, match="NaN or Inf"):
        parse_request(*_binary(np.array([[np.nan, 1]], np.float32)), SPEC)


def test_response_binary_and_json():
    out = {"logits": np.array([[1.5, -2.0]], np.float32)}
    body, headers, media = build_response("m", "1", InferRequest("7", {}, None, set(), True), out)
    n = int(headers["Inference-Header-Content-Length"])
    head = json.loads(body[:n])
    assert media == "application/octet-stream" and head["id"] == "7"
    assert head["outputs"][0]["parameters"]["binary_data_size"] == 8
    np.testing.assert_array_equal(np.frombuffer(body[n:], np.float32), [1.5, -2.0])
    body, headers, media = build_response("m", "1", InferRequest(None, {}, ["logits"], set(), False), out)
    assert media == "application/json" and json.loads(body)["outputs"][0]["data"] == [1.5, -2.0]


def test_non_finite_json_outputs_are_found_after_serialising_and_a_null_in_a_name_is_not_one():
    from keiryo.serve.protocol import NonFiniteOutput

    finite = {"null": np.array([[1.0, 2.0]], np.float32)}
    body, _, _ = build_response("null", "1", InferRequest("null", {}, None, set(), False), finite)
    assert json.loads(body)["outputs"][0]["data"] == [1.0, 2.0]
    both = {"a": np.array([[1.0]], np.float32), "b": np.array([[np.nan]], np.float16)}
    with pytest.raises(NonFiniteOutput, match="'b'"):
        build_response("m", "1", InferRequest(None, {}, None, set(), False), both)
    body, _, _ = build_response("m", "1", InferRequest(None, {}, None, {"b"}, False), both)  # b in binary: fine
    assert body


# ---------------------------------------------------------------- big bodies off the event loop (serve/offload.py)


def _big_body(rows: int) -> bytes:
    x = np.random.default_rng(0).random((rows, 2)).round(6)
    return json.dumps(
        {"id": "big", "inputs": [{"name": "input", "datatype": "FP32", "shape": [rows, 2], "data": x.tolist()}]}
    ).encode()


def test_the_worker_parses_like_the_loop_and_refuses_like_it():
    from keiryo.serve.offload import OffLoopParser

    body = _big_body(5000)
    raw = np.arange(4, dtype="<f4").tobytes()
    head = json.dumps(
        {"inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 2], "parameters": {"binary_data_size": 16}}]}
    ).encode()

    async def main():
        p = OffLoopParser(1 << 20)
        try:
            got = await p.parse(body, None, SPEC, len(body))
            got_bin = await p.parse(head + raw, str(len(head)), SPEC, len(head))
            errors = []
            for bad in (b"[" * 200_000, b'{"inputs": [{"name": "nope"}]}', b"{not json"):
                with pytest.raises(ProtocolError) as e:
                    await p.parse(bad, None, SPEC, len(bad))
                errors.append(str(e.value))
            return got, got_bin, errors, p.budget.used
        finally:
            await p.aclose()

    got, got_bin, errors, used = asyncio.run(main())
    want = parse_request(body, None, SPEC)
    assert got.id == "big" and got.inputs["input"].dtype == np.float32
    np.testing.assert_array_equal(got.inputs["input"], want.inputs["input"])
    np.testing.assert_array_equal(got_bin.inputs["input"], np.arange(4, dtype=np.float32).reshape(2, 2))
    assert "depth limit exceeded" in errors[0] and "unknown input 'nope'" in errors[1] and "not valid JSON" in errors[2]
    assert used == 0


def test_bodies_past_the_byte_cap_get_503_with_retry_after_not_a_queue():
    from keiryo.serve.errors import HTTPError
    from keiryo.serve.offload import OffLoopParser

    body = _big_body(20000)

    async def main():
        p = OffLoopParser(int(len(body) * 1.5))  # room for one body at a time
        try:
            results = await asyncio.gather(*(p.parse(body, None, SPEC, len(body)) for _ in range(3)), return_exceptions=True)
            again = await p.parse(body, None, SPEC, len(body))  # the bytes were given back
            return results, again, p.budget.used
        finally:
            await p.aclose()

    results, again, used = asyncio.run(main())
    ok = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, HTTPError)]
    assert len(ok) == 1 and len(refused) == 2
    assert all(e.status == 503 and e.headers == {"Retry-After": "1"} and "bytes in flight" in e.message for e in refused)
    assert again.inputs["input"].shape == (20000, 2) and used == 0


def test_a_worker_that_dies_mid_parse_is_a_503_and_the_next_request_gets_a_new_one():
    from keiryo.serve.errors import HTTPError
    from keiryo.serve.offload import OffLoopParser

    body = _big_body(200_000)  # long enough to be killed mid-parse

    async def main():
        p = OffLoopParser(1 << 30)
        try:
            await p.parse(b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}]}', None, SPEC, 10)
            first = p._proc
            task = asyncio.create_task(p.parse(body, None, SPEC, len(body)))
            await asyncio.sleep(0.01)  # the body is on its way (3 MB: far from sent and parsed by now)
            first.kill()
            with pytest.raises(HTTPError) as e:
                await task
            again = await p.parse(_big_body(3), None, SPEC, 10)
            return e.value, first, p._proc, again, p.budget.used
        finally:
            await p.aclose()

    err, first, second, again, used = asyncio.run(main())
    assert err.status == 503 and "parser stopped" in err.message
    assert second is not first and again.inputs["input"].shape == (3, 2) and used == 0


def test_small_bodies_are_parsed_on_the_loop_and_big_ones_in_the_worker():
    """The hot path keeps no hop: below parse_offload_bytes the server never starts the worker."""
    from keiryo.serve.lifecycle import Server
    from keiryo.serve.settings import ServeSettings

    class Served:
        name, version, inputs = "m", "1", SPEC

        def __init__(self):
            self.batcher = Batcher(lambda feed: {"out": feed["input"] * 2}, max_batch_size=1, max_queue_delay_ms=0)

    settings = ServeSettings(models=["m"], public_key="k.pem", allow_anonymous=True, parse_offload_bytes=4096)
    small = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}]}).encode()
    big = _big_body(1000)

    async def main():
        server, served = Server(None, settings), Served()
        served.batcher.start()
        try:
            out_small = await server.infer_rest(served, small, None)
            spawned_after_small = server.parser._proc is not None
            out_big = await server.infer_rest(served, big, None)
            spawned_after_big = server.parser._proc is not None
        finally:
            await served.batcher.drain()
            await server.parser.aclose()
        return out_small, spawned_after_small, out_big, spawned_after_big

    out_small, after_small, out_big, after_big = asyncio.run(main())
    assert not after_small and after_big
    assert json.loads(out_small[0])["outputs"][0]["data"] == [2.0, 4.0]
    assert json.loads(out_big[0])["outputs"][0]["shape"] == [1000, 2]


def test_log_lines_are_written_by_the_background_thread_and_flushed_on_stop():
    """keiryo serve's log handler: lines formatted in the caller's thread, written in one go by a thread that
    wakes on its own clock (no hand-off per line), all of them out by stop()."""
    import io
    import logging

    from keiryo.serve.run import BackgroundLines

    stream = io.StringIO()
    h = BackgroundLines(stream, interval=0.01)
    h.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    log = logging.getLogger("keiryo.test-background-lines")
    log.addHandler(h)
    log.propagate = False
    try:
        h.start()
        log.warning("first %d", 1)
        deadline = time.time() + 5
        while "first 1" not in stream.getvalue() and time.time() < deadline:
            time.sleep(0.01)
        assert stream.getvalue() == "WARNING first 1\n"  # written by the thread, without stop()
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")
        for i in range(100):
            log.warning("line %d", i)
        h.stop()
    finally:
        log.removeHandler(h)
    lines = stream.getvalue().splitlines()
    assert lines[1] == "ERROR failed" and "ValueError: boom" in stream.getvalue()
    assert lines[-100:] == [f"WARNING line {i}" for i in range(100)]


def test_a_stalled_log_stream_never_grows_the_buffer_past_its_bound():
    """A stderr nobody reads blocks the writer thread; requests keep logging: the buffer stays at max_lines, the
    oldest lines are dropped, and once the stream moves their count is written before the newest lines."""
    import io
    import threading

    from keiryo.serve.run import BackgroundLines

    class Stalled(io.StringIO):
        def __init__(self) -> None:
            super().__init__()
            self.go = threading.Event()

        def write(self, text: str) -> int:
            self.go.wait(10)
            return super().write(text)

    stream = Stalled()
    h = BackgroundLines(stream, interval=0.01, max_lines=50)
    h.start()
    try:
        h.write_line("first")
        time.sleep(0.1)  # the writer took "first" and is stuck in write()
        for i in range(1000):
            h.write_line(f"line {i}")
        assert len(h._lines) == 50 and h.dropped == 950
    finally:
        stream.go.set()
        h.stop()
    lines = stream.getvalue().splitlines()
    assert lines[0] == "first" and "950 log line(s) dropped" in lines[1]
    assert lines[2:] == [f"line {i}" for i in range(950, 1000)]


# ---------------------------------------------------------------- per-request bookkeeping without a lock or timer each


def test_request_metrics_expose_what_prometheus_clients_own_metrics_would():
    """The plain-number request metrics scrape as the same samples prometheus_client's Counter, Histogram
    and Gauge give for the same observations (bucket edges included: a value on a bound counts in it)."""
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    from keiryo.serve.metrics import LATENCY_BUCKETS, Metrics

    ours = Metrics()
    ref = CollectorRegistry()
    requests = Counter("keiryo_requests", "x", ["model", "endpoint", "status"], registry=ref)
    latency = Histogram("keiryo_request_latency_seconds", "x", ["model"], buckets=LATENCY_BUCKETS, registry=ref)
    in_flight = Gauge("keiryo_in_flight_requests", "x", registry=ref)
    values = [0.0005, 0.0004, 0.001, 0.0011, 10, 11, 0.3, 0.3, 2.5]
    for i, v in enumerate(values):
        status = 200 if i % 3 else 404
        ours.request("demo", "infer", status, v)
        requests.labels("demo", "infer", str(status)).inc()
        latency.labels("demo").observe(v)
    ours.request("", "other", 401, 0.1)  # counted, not timed
    requests.labels("", "other", "401").inc()
    ours.per_request.in_flight += 2
    in_flight.inc(2)

    def samples(registry):
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for m in registry.collect()
            for s in m.samples
            if not s.name.endswith("_created") and s.name.startswith(("keiryo_requests", "keiryo_request_", "keiryo_in"))
        }

    got, want = samples(ours.registry), samples(ref)
    assert got == pytest.approx(want) and len(want) == 3 + len(LATENCY_BUCKETS) + 1 + 2 + 1
    assert ours.registry.get_sample_value("keiryo_request_latency_seconds_bucket", {"model": "demo", "le": "0.0005"}) == 2
    hooks = ours.batch_hooks("demo")
    hooks["on_batch"](3)
    assert ours.registry.get_sample_value("keiryo_batch_size_bucket", {"model": "demo", "le": "4.0"}) == 1
    assert ours.registry.get_sample_value("keiryo_batch_size_count", {"model": "demo"}) == 1


def test_deadlines_fire_once_after_their_time_and_not_when_forgotten_or_moved():
    from keiryo.serve.deadlines import Deadlines

    fired: list[tuple[str, float]] = []

    async def main():
        loop = asyncio.get_running_loop()
        d = Deadlines(loop, tick=0.01)
        t0 = loop.time()

        def fire(key):
            fired.append((key, loop.time() - t0))

        d.watch("a", 0.05, fire)
        d.watch("b", 0.05, fire)
        d.watch("c", 0.05, fire)
        d.forget("b")
        await asyncio.sleep(0.03)
        d.watch("c", 0.1, fire)  # moved: due 0.13 s from the start
        assert d.watching("c") and not d.watching("b")
        await asyncio.sleep(0.2)
        assert not d.watching("c") and d._timer is None  # nothing watched: no timer left ticking

    asyncio.run(main())
    assert [k for k, _ in fired] == ["a", "c"]

    async def of():  # one per loop and tick
        loop = asyncio.get_running_loop()
        return Deadlines.of(loop, 0.5), Deadlines.of(loop, 0.5), Deadlines.of(loop, 0.25)

    (a1, a2, a3), (b1, _, _) = asyncio.run(of()), asyncio.run(of())
    assert a1 is a2 and a1 is not a3 and b1 is not a1 and b1.loop is not a1.loop
    (_, ta), (_, tc) = fired
    assert 0.05 <= ta < 0.05 + 0.01 + 0.03 and 0.13 <= tc < 0.13 + 0.01 + 0.03


def test_one_write_sends_a_held_head_with_its_body_and_passes_everything_else_through():
    from keiryo.serve.connections import OneWrite

    class Transport:
        def __init__(self):
            self.sent: list[bytes] = []
            self.closed = False

        def write(self, data):
            self.sent.append(bytes(data))

        def writelines(self, parts):
            self.sent.append(b"".join(parts))

        def close(self):
            self.closed = True

    t = Transport()
    w = OneWrite(t)
    w.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # nothing held: at once
    w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")  # a head nobody asked to hold (FastAPI's routes)
    assert len(t.sent) == 2
    w.hold_next()
    w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    assert len(t.sent) == 2
    w.write(b"{}")
    assert t.sent[2] == b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"  # one send
    big = b"x" * 100_000
    w.hold_next()
    w.write(b"HTTP/1.1 200 OK\r\n\r\n")
    w.write(big)
    assert t.sent[3] == b"HTTP/1.1 200 OK\r\n\r\n" + big  # one writev, no copy of the body
    w.hold_next()
    w.flush()  # held, no head came: nothing to send, nothing held any more
    w.write(b"more")
    assert t.sent[4] == b"more"
    w.hold_next()
    w.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    w.close()  # closing sends what is held first
    assert t.sent[5].startswith(b"HTTP/1.1 400") and t.closed
