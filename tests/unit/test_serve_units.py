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
