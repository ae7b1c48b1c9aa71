"""Keeping a running claim's lease alive: one daemon thread per process beats every claim.

A claim's lease is extended every ``heartbeat_interval_seconds``; when a beat finds the claim
taken over (its lease expired and another run adopted it), the step learns it before it stores
its outputs and fails instead of recording work that is no longer its own.
"""

from __future__ import annotations

import math
import os
import threading
import time

from .ledger import Ledger


class Heartbeat:
    """Extends one claim's lease every `interval` seconds; notices when the claim was lost."""

    def __init__(self, ledger: Ledger, key: str, fence: int, interval: float) -> None:
        self.ledger = ledger
        self.key = key
        self.fence = fence
        self.interval = max(interval, 0.05)
        self.next_due = time.monotonic() + self.interval
        self.lost = False
        self.last_error: Exception | None = None

    def start(self) -> None:
        _HEARTBEATER.add(self)

    def stop(self) -> None:
        _HEARTBEATER.remove(self)

    def beat(self) -> None:
        self.next_due = time.monotonic() + self.interval
        try:
            alive = self.ledger.heartbeat(self.key, self.fence)
        except Exception as exc:  # an outage: keep trying, the lease covers a short one
            self.last_error = exc
            return
        if not alive:
            self.lost = True
            _HEARTBEATER.remove(self)


class _Heartbeater:
    """One daemon thread per process beating every running claim when it is due.

    Cheaper than a thread per step (nothing to start or join on the hot path), and a step that
    finishes simply drops out of the set. The thread is woken only when a new claim is due
    before the thread would look anyway: a step's claim is due a quarter lease after it starts,
    later than anything already scheduled, so back-to-back steps never wake it (waking it costs
    a thread switch per step).
    """

    def __init__(self) -> None:
        self._beats: dict[int, Heartbeat] = {}
        self._wake = threading.Condition()
        self._pid = -1
        self._looks_at = math.inf
        """When the thread looks at the beats next: inf while it waits for a notify, -inf while
        it is awake (it rescans before it sleeps again)."""

    def add(self, beat: Heartbeat) -> None:
        with self._wake:
            self._beats[id(beat)] = beat
            if self._pid != os.getpid():  # first use in this process (or after a fork)
                self._pid = os.getpid()
                self._looks_at = -math.inf
                threading.Thread(target=self._run, name="rocky-heartbeat", daemon=True).start()
            elif beat.next_due < self._looks_at:
                self._wake.notify()

    def remove(self, beat: Heartbeat) -> None:
        with self._wake:
            self._beats.pop(id(beat), None)

    def _run(self) -> None:
        while True:
            with self._wake:
                now = time.monotonic()
                due = [b for b in self._beats.values() if b.next_due <= now]
                if not due:
                    if self._beats:
                        self._looks_at = min(b.next_due for b in self._beats.values())
                        self._wake.wait(self._looks_at - now)
                    else:
                        self._looks_at = math.inf
                        self._wake.wait()
                    self._looks_at = -math.inf
                    continue
            for beat in due:
                with self._wake:
                    if id(beat) not in self._beats:
                        continue  # stopped meanwhile
                beat.beat()


_HEARTBEATER = _Heartbeater()
