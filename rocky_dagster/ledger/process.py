"""Which process holds an in-flight claim, and whether that process is still running.

A claim records its claimant's identity (`current`) in the entry's `holder_process`, so a
later claim by the same run can tell an earlier attempt that is over (its process gone, or
its claim kept for the retry: `PARKED`) from one that still runs (another process or thread
of the run). Liveness is only ever known for processes of this boot and PID namespace;
anything else is assumed alive (the lease settles it).

On Linux an identity is `proc:<boot_id>/<pid-namespace inode>/<pid>/<start time>`: the boot
id tells machines and reboots apart even when host names collide, the namespace inode
containers sharing a kernel, and the start time (clock ticks since boot, /proc/<pid>/stat
field 22) a reused pid. Elsewhere it is `host:<hostname>/<pid>`, whose liveness is unknown.
"""

from __future__ import annotations

import os
import socket
from enum import StrEnum

PARKED = "parked"
"""`holder_process` of a claim kept for its run's retry (`Ledger.keep_for_retry`): no process
works on it, the run's next attempt re-enters it at once."""

_cached: tuple[int, str] | None = None


def current() -> str:
    """This process's identity (cached per pid, so a forked child computes its own)."""
    global _cached
    pid = os.getpid()
    if _cached is None or _cached[0] != pid:
        _cached = (pid, _identify(pid))
    return _cached[1]


def _identify(pid: int) -> str:
    try:
        start = _start_time(pid)
        if start is not None:
            return f"proc:{_boot_id()}/{os.stat('/proc/self/ns/pid').st_ino}/{pid}/{start}"
    except OSError:
        pass
    return f"host:{socket.gethostname()}/{pid}"


def _boot_id() -> str:
    with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as file:
        return file.read().strip()


def _stat(pid: int) -> tuple[str, str] | None:
    """(state, start time) from /proc/<pid>/stat; None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as file:
            text = file.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text[text.rindex(")") + 2 :].split()  # the name (field 2) may hold spaces and ')'
    return fields[0], fields[19]  # fields 3 and 22


def _start_time(pid: int) -> str | None:
    found = _stat(pid)
    return None if found is None else found[1]


class Holder(StrEnum):
    """What a claimant can know about the process recorded as holding a claim."""

    PARKED = "kept for the retry"
    GONE = "its process is gone"
    SELF = "held by this very process"
    ALIVE = "its process is running"
    UNKNOWN = "its process cannot be checked from here"


def holder(recorded: str | None, me: str) -> Holder:
    """Whether the recorded holder of a claim is over (PARKED, GONE) or may still run.

    NULL (a row written before holders were recorded) is UNKNOWN: only an explicit park
    lets the run's next attempt in before the lease ends.
    """
    if recorded == PARKED:
        return Holder.PARKED
    if recorded is None:
        return Holder.UNKNOWN
    if recorded == me:
        return Holder.SELF
    theirs, mine = recorded.split("/"), me.split("/")
    if len(theirs) != 4 or len(mine) != 4 or not recorded.startswith("proc:"):
        return Holder.UNKNOWN
    if theirs[:2] != mine[:2] or not theirs[2].isdigit():
        return Holder.UNKNOWN  # another boot, machine or PID namespace
    try:
        found = _stat(int(theirs[2]))
    except (OSError, ValueError):
        return Holder.UNKNOWN
    if found is None or found[1] != theirs[3] or found[0] in ("Z", "X"):
        return Holder.GONE  # exited (a zombie only waits to be reaped), or the pid was reused
    return Holder.ALIVE
