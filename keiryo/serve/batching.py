"""Dynamic micro-batching: requests to one model are queued and run together on its one session.

A worker takes the first waiting request, then keeps collecting until the batch holds
``max_batch_size`` rows or ``max_queue_delay_ms`` has passed (it does not wait when no other
request is in flight, so a lone client pays no delay), concatenates the inputs, runs the
session once in a worker thread and hands each request its rows. ``max_batch_size=1`` runs every
request alone (no batching). The queue is bounded: when ``max_queue`` requests wait, new ones are
refused at once (:class:`QueueFull`, HTTP 503) instead of piling up latency.

The idle fast path: when nothing is queued or running and this model's recent lone runs took under
``inline_below_ms`` for this many rows (the median of the last few, per row, times the request's rows), the
request waits one turn of the event loop and, if no other request reached the batcher meanwhile, runs right
away on the loop's thread. The queue wake-up and the hand-off to the session thread and back cost about as
much as such a model's whole run; blocking the loop for under that long costs less. Requests that arrive
together all take the queue and the session thread (and batch).

Requests that arrive one loop turn apart (concurrent gRPC calls: grpc.aio accepts one call per turn) would
each find the batcher idle and run alone on the loop, never batching. So the fast path is taken only while
the traffic is seen to be serial: after a request that was alone for its whole stay (it found the batcher
idle and no other request arrived before it was answered), and a probe, one eligible request in ``PROBE_EVERY``,
still takes the queue and the session thread, leaving the loop free: if others arrive meanwhile, they batch
and the fast path stays off until a request is alone again. Each probe that finds no company doubles the
interval to the next, up to ``PROBE_MAX``; company brings it back to ``PROBE_EVERY``. The hand-off costs a
lone client about half a millisecond of CPU on a 2-vCPU virtual machine (two thread wake-ups, the session on
a cold core): one request in 8 made that 62 µs per request at concurrency 1, one in 128 makes it 4.
Concurrent clients that start after a long serial stretch lose batching for at most ``PROBE_MAX`` requests.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

PROBE_EVERY = 8  # one eligible lone request in this many takes the queue anyway, to see whether others come
PROBE_MAX = 128  # ... doubling while nobody does, up to one in this many
_RECENT = 8  # lone runs whose median (per row) estimates the next one


class QueueFull(RuntimeError):
    """The model's queue is full (HTTP 503)."""


@dataclass
class _Item:
    inputs: dict[str, np.ndarray]
    rows: int
    future: asyncio.Future[dict[str, np.ndarray]]
    enqueued: float = field(default_factory=time.perf_counter)
    settled: bool = False  # counted out of ``in_flight`` (answered by the worker, or given up by its caller)


class Batcher:
    def __init__(
        self,
        run: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
        *,
        max_batch_size: int = 32,
        max_queue_delay_ms: float = 2.0,
        max_queue: int = 256,
        on_queue_time: Callable[[float], None] | None = None,
        on_batch: Callable[[int], None] | None = None,
        inline_below_ms: float = 2.0,
    ):
        self._run = run
        self.inline_below = inline_below_ms / 1000
        self._lone: deque[float] = deque(maxlen=_RECENT)  # seconds per row of recent one-request runs
        self._arrivals = 0  # requests that reached submit(), ever
        self._serial = False  # the last request answered was alone for its whole stay
        self._inline_runs = 0  # fast-path runs since a request last took the queue
        self._probe_every = PROBE_EVERY  # eligible requests per probe, now
        self.runs = {"inline": 0, "queued": 0}  # requests answered by each path (tests, debugging)
        self.max_batch_size = max_batch_size
        self.max_delay = max_queue_delay_ms / 1000
        self.max_queue = max_queue
        self._on_queue_time = on_queue_time or (lambda seconds: None)
        self._on_batch = on_batch or (lambda rows: None)
        self._queue: asyncio.Queue[_Item] | None = None
        self._task: asyncio.Task[None] | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="keiryo-session")
        self.in_flight = 0

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._worker())

    def _per_row_s(self) -> float | None:
        """Seconds per row of this model's recent lone runs (their median, the upper one of an even count), None
        before the first; sorted by hand: statistics.median costs a few µs per request."""
        lone = self._lone
        return sorted(lone)[len(lone) // 2] if lone else None

    async def submit(self, inputs: dict[str, np.ndarray], timeout: float | None = None) -> dict[str, np.ndarray]:
        """The model's outputs for ``inputs`` (their rows only); ``timeout``: seconds to wait for the queue
        and the session (TimeoutError), not applied to a fast-path run, which is under ``inline_below_ms``."""
        assert self._queue is not None, "Batcher.start() was not called"
        if self._queue.qsize() >= self.max_queue:
            raise QueueFull(f"queue full ({self.max_queue} requests waiting)")
        rows = int(next(iter(inputs.values())).shape[0])
        self._arrivals += 1
        arrival = self._arrivals
        idle = self.in_flight == 0 and self._queue.empty()
        if idle and self._serial and self.inline_below > 0 and rows <= self.max_batch_size:
            per_row = self._per_row_s()
            if per_row is not None and per_row * rows < self.inline_below and self._inline_runs < self._probe_every - 1:
                self.in_flight += 1  # seen by requests that arrived with this one: they take the queue
                try:
                    await asyncio.sleep(0)  # one loop turn: requests ready at the same time reach submit() too
                    alone = self._arrivals == arrival and self._queue.empty()
                    if alone:
                        self._inline_runs += 1
                        self.runs["inline"] += 1
                        self._on_queue_time(0.0)
                        self._on_batch(rows)
                        return self._timed(inputs, rows)
                finally:
                    self.in_flight -= 1
                self._serial = False  # company came in that turn
                self._probe_every = PROBE_EVERY
        probe = idle and self._serial  # an eligible request taking the queue (or the first of a lone client)
        self._inline_runs = 0
        self.runs["queued"] += 1
        item = _Item(inputs, rows, asyncio.get_running_loop().create_future())
        self.in_flight += 1
        try:
            async with asyncio.timeout(timeout):  # no extra task, unlike wait_for
                await self._queue.put(item)
                out = await item.future
            self._serial = idle and self._arrivals == arrival  # alone from arrival to answer
            if probe:  # nobody came while the loop was free: probe half as often; somebody did: as often as at first
                self._probe_every = min(2 * self._probe_every, PROBE_MAX) if self._serial else PROBE_EVERY
            return out
        except BaseException:
            self._serial = False
            raise
        finally:
            self._settle(item)

    def _timed(self, feed: dict[str, np.ndarray], lone_rows: int = 0) -> dict[str, np.ndarray]:
        """Run the session; a one-request run (``lone_rows`` > 0) is timed for the fast path's estimate."""
        t = time.perf_counter()
        out = self._run(feed)
        if lone_rows:
            self._lone.append((time.perf_counter() - t) / lone_rows)
        return out

    def _settle(self, item: _Item) -> None:
        if not item.settled:
            item.settled = True
            self.in_flight -= 1

    async def _worker(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            first = await self._queue.get()
            batch = [first]
            rows = first.rows
            deadline = loop.time() + self.max_delay
            while rows < self.max_batch_size:
                timeout = deadline - loop.time()
                if self._queue.empty() and (timeout <= 0 or self.in_flight <= len(batch)):
                    break  # nothing else is on its way (a lone request never waits for company)
                try:
                    if timeout <= 0 or not self._queue.empty():
                        nxt = self._queue.get_nowait()
                    else:
                        async with asyncio.timeout_at(deadline):  # no task per wait, unlike wait_for
                            nxt = await self._queue.get()
                except (TimeoutError, asyncio.QueueEmpty):
                    break
                if rows + nxt.rows > self.max_batch_size:
                    await self._run_batch(batch)  # run what we have; the newcomer starts the next batch
                    batch, rows = [nxt], nxt.rows
                    deadline = loop.time() + self.max_delay
                    continue
                batch.append(nxt)
                rows += nxt.rows
            await self._run_batch(batch)

    async def _run_batch(self, batch: list[_Item]) -> None:
        live = [b for b in batch if not b.future.done()]  # a timed-out request was cancelled: skip it
        if not live:
            return
        now = time.perf_counter()
        for b in live:
            self._on_queue_time(now - b.enqueued)
        names = list(live[0].inputs)
        feed = {n: np.concatenate([b.inputs[n] for b in live]) if len(live) > 1 else live[0].inputs[n] for n in names}
        self._on_batch(sum(b.rows for b in live))
        try:
            lone_rows = live[0].rows if len(live) == 1 else 0
            out = await asyncio.get_running_loop().run_in_executor(self._pool, self._timed, feed, lone_rows)
        except Exception as e:  # the session failed: every request of the batch gets the error
            for b in live:
                self._settle(b)
                if not b.future.done():
                    b.future.set_exception(e)
            return
        start = 0
        for b in live:
            part = {k: v[start : start + b.rows] for k, v in out.items()}
            start += b.rows
            self._settle(b)  # answered: no longer "on its way" for the next batch's wait, whether or not its caller resumed
            if not b.future.done():
                b.future.set_result(part)

    async def drain(self, timeout: float = 30.0) -> None:
        """Wait until queued and running requests are answered (graceful shutdown), then stop the worker."""
        end = time.monotonic() + timeout
        while (self.in_flight or (self._queue is not None and not self._queue.empty())) and time.monotonic() < end:
            await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        self._pool.shutdown(wait=True)
