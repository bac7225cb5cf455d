"""Deadlines checked by one timer per event loop instead of one timer per request.

The server has two deadlines on every request: complete headers within ``header_timeout_s`` of a connection
opening or of its previous response (:mod:`keiryo.serve.connections`), and each piece of a body within
``body_timeout_s`` (:mod:`keiryo.serve.front`). Armed with a timer each (``loop.call_later`` and cancel for the
header, ``asyncio.timeout`` for every body read) they cost about 7 µs of the event loop's time per request, a
tenth of the Python a small inference request runs. Here a deadline is an entry in a dict, and one
self-rescheduling timer looks at them every ``tick`` seconds: an expired one fires between its deadline and a
tick later.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable, Hashable


class Deadlines:
    """``watch(key, seconds, fire)``: call ``fire(key)`` once, on the loop, if ``key`` is still watched ``seconds``
    from now (up to a ``tick`` later); watching a key again moves its deadline; ``forget(key)`` ends the watch.
    Used from the loop's thread only."""

    def __init__(self, loop: asyncio.AbstractEventLoop, tick: float):
        self.loop, self.tick = loop, tick
        self._due: dict[Hashable, tuple[float, Callable[[Hashable], None]]] = {}
        self._timer: asyncio.TimerHandle | None = None

    def watch(self, key: Hashable, seconds: float, fire: Callable[[Hashable], None]) -> None:
        self._due[key] = (self.loop.time() + seconds, fire)
        if self._timer is None:
            self._timer = self.loop.call_later(self.tick, self._sweep)

    def watching(self, key: Hashable) -> bool:
        return key in self._due

    def forget(self, key: Hashable) -> None:
        self._due.pop(key, None)

    def _sweep(self) -> None:
        now = self.loop.time()
        expired = [(k, fire) for k, (at, fire) in self._due.items() if at <= now]
        for k, fire in expired:
            del self._due[k]
            fire(k)
        # keeps ticking while anything is watched; a lone client's requests come and go between ticks
        self._timer = self.loop.call_later(self.tick, self._sweep) if self._due else None

    @staticmethod
    def of(loop: asyncio.AbstractEventLoop, tick: float) -> Deadlines:
        """The loop's deadlines swept every ``tick`` (one per loop and tick: servers on different loops, in
        tests, never share one)."""
        mine = _BY_LOOP.get(loop)
        if mine is None:
            mine = _BY_LOOP[loop] = {}
        d = mine.get(tick)
        if d is None:
            d = mine[tick] = Deadlines(loop, tick)
        return d

    @staticmethod
    def tick_for(seconds: float) -> float:
        """A tick that lets a deadline of ``seconds`` overrun by at most a quarter of it (and by 1 s at most)."""
        return min(1.0, seconds / 4)


_BY_LOOP: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[float, Deadlines]] = weakref.WeakKeyDictionary()
