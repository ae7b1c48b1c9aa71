"""Keeping a running claim's lease alive: one daemon thread per process beats every claim.

A claim's lease is extended every ``heartbeat_interval_seconds``; when a beat finds the claim
taken over (its lease expired and another run adopted it), the step learns it before it stores
its outputs and fails instead of recording work that is no longer its own.

A second thread watches each step's run (`StepWatch`) on the same schedule: when the run is
gone (its run worker died, or the instance marked it finished), or a beat found a claim lost,
the step's body is interrupted in its own process, the way Dagster interrupts a step (SIGINT to
the process; the step runs in the main thread), so a step never goes on doing side effects as
an orphan.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from rocky_dagster.ledger import Ledger


@dataclass(frozen=True)
class Stop:
    """Why a step's watch stopped it."""

    why: str
    """e.g. "its run worker (pid 123) is gone"."""
    lost: bool = False
    """A heartbeat found a claim lost (the step fails "lost its claim"); else its run is gone."""
    interrupted: bool = False
    """The body was sent an interrupt (False: it could not be, and runs to its end)."""


class StepWatch:
    """One running step's "is my run gone?" check, and the switch that interrupts its body.

    Started when the step's first claim starts heartbeating; its claims' beats share it. A
    second daemon thread ("rocky-run-watch", beside the heartbeat thread, so a slow instance
    never delays a lease) calls `check` once per interval, never on the step's own path. When
    the check names a reason, or a beat finds a claim lost, `stop_step` interrupts the step,
    atomically with `disarm`: once the step disarmed its watch (it left its body and is
    settling its claims), it is never interrupted.
    """

    def __init__(
        self, check: Callable[[], str | None], interval: float, *, interruptible: bool
    ) -> None:
        self._check = check
        self.interval = max(interval, 0.05)
        self.next_due = time.monotonic() + self.interval
        self.interruptible = interruptible
        """The step runs in this process's main thread, where an interrupt lands in its body."""
        self.armed = True
        self.stop: Stop | None = None

    def start(self) -> None:
        _WATCHER.add(self)

    def beat(self) -> None:
        """The watch thread's look: stop the step if its run is gone."""
        self.next_due = time.monotonic() + self.interval
        try:
            why = self._check()
        except Exception:  # an instance outage is not a dead run: look again next time
            return
        if why is not None:
            stop_step(self, Stop(why))

    def disarm(self) -> Stop | None:
        """The step is leaving its body: never interrupt it from now on. Returns why it was
        stopped meanwhile (None: it was not)."""
        with _STOP_LOCK:
            self.armed = False
        _WATCHER.remove(self)
        return self.stop


_STOP_LOCK = threading.Lock()
"""Serialises `stop_step` with `StepWatch.disarm` (one interrupt, never after a disarm)."""


def stop_step(watch: StepWatch, stop: Stop) -> None:
    """Interrupt the watched step, unless it disarmed its watch (it left its body) first.

    Under the same lock as `disarm`: a step that has begun settling is never interrupted, and a
    step is interrupted at most once. The interrupt is Dagster's own (`send_interrupt`): SIGINT
    to this process, which Dagster raises in the step's body as `DagsterExecutionInterruptedError`
    (it wakes a `time.sleep` too). Sent only when the step runs in the main thread and SIGINT has
    a Python handler; otherwise the body runs to its end and the step settles then.
    """
    with _STOP_LOCK:
        if not watch.armed:
            return
        watch.armed = False
        interrupted = watch.interruptible and _interrupt_main()
        watch.stop = Stop(stop.why, lost=stop.lost, interrupted=interrupted)
    _WATCHER.remove(watch)


class Heartbeat:
    """Extends one claim's lease every `interval` seconds; notices when the claim was lost."""

    def __init__(
        self,
        ledger: Ledger,
        key: str,
        fence: int,
        interval: float,
        watch: StepWatch | None = None,
    ) -> None:
        self.ledger = ledger
        self.key = key
        self.fence = fence
        self.interval = max(interval, 0.05)
        self.next_due = time.monotonic() + self.interval
        self.lost = False
        self.last_error: Exception | None = None
        self.watch = watch

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
            if self.watch is not None:
                stop_step(
                    self.watch, Stop(f"a heartbeat found its claim on '{self.key}' lost", lost=True)
                )


class _Heartbeater:
    """One daemon thread per process beating every running claim (or watch) when it is due.

    Cheaper than a thread per step (nothing to start or join on the hot path), and a step that
    finishes simply drops out of the set. The thread is woken only when a new claim is due
    before the thread would look anyway: a step's claim is due a quarter lease after it starts,
    later than anything already scheduled, so back-to-back steps never wake it (waking it costs
    a thread switch per step).
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._beats: dict[int, Heartbeat | StepWatch] = {}
        self._wake = threading.Condition()
        self._pid = -1
        self._looks_at = math.inf
        """When the thread looks at the beats next: inf while it waits for a notify, -inf while
        it is awake (it rescans before it sleeps again)."""

    def add(self, beat: Heartbeat | StepWatch) -> None:
        with self._wake:
            self._beats[id(beat)] = beat
            if self._pid != os.getpid():  # first use in this process (or after a fork)
                self._pid = os.getpid()
                self._looks_at = -math.inf
                threading.Thread(target=self._run, name=self._name, daemon=True).start()
            elif beat.next_due < self._looks_at:
                self._wake.notify()

    def remove(self, beat: Heartbeat | StepWatch) -> None:
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


_HEARTBEATER = _Heartbeater("rocky-heartbeat")
_WATCHER = _Heartbeater("rocky-run-watch")


def _interrupt_main() -> bool:
    """Send this process the interrupt Dagster sends a step it cancels; False if it cannot."""
    handler = signal.getsignal(signal.SIGINT)
    if not callable(handler):  # SIG_DFL would kill the process, SIG_IGN would do nothing
        return False
    if sys.platform == "win32":  # pragma: no cover - what Dagster does there too
        import _thread

        _thread.interrupt_main()
    else:
        os.kill(os.getpid(), signal.SIGINT)
    return True
