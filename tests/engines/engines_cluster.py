"""Real servers for the engine tests and benchmarks: Redis, Celery workers, a Dask cluster.

Plain module (no pytest), shared by tests/engines and benchmarks/engines_bench.py. Everything
listens on 127.0.0.1 on a free port, logs to a file in its own directory, and is stopped by
`stop()` (also at interpreter exit). Waits are upper bounds on a hang, never timings.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

START_TIMEOUT = 180.0
T = TypeVar("T")


def wait_for(condition: Callable[[], T | None], what: str, timeout: float = 180.0) -> T:
    """Poll `condition` until it returns something truthy (an upper bound, not a timing)."""
    deadline = time.monotonic() + timeout
    while True:
        found = condition()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tool(name: str) -> str:
    """A console script of this interpreter's environment (dagster-celery, dask), else PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} is not installed in {sys.prefix} nor on PATH")
    return found


class Service:
    """One server process in its own session (so its whole process tree can be killed)."""

    def __init__(self, name: str, root: Path) -> None:
        self.name = name
        self.root = root
        self.log = root / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def spawn(self, cmd: Sequence[str], env: dict[str, str] | None = None) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                list(cmd),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=self.root,
                start_new_session=True,
            )
        atexit.register(self.stop)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def kill_all(self) -> None:
        """SIGKILL the whole process tree (its session's process group) and reap it."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill_all()
        # whatever the group left behind (a pool child reparented away) goes too
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)


class RedisServer(Service):
    """redis-server from PATH (Debian's package), no persistence."""

    def __init__(self, root: Path) -> None:
        super().__init__("redis", root)
        self.port = free_port()

    def start(self) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not on PATH: apt-get install redis-server")
        self.spawn(
            [
                binary,
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.root),
            ]
        )
        wait_for(self.ping, "redis-server to answer PING", START_TIMEOUT)
        return self

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def client(self, db: int = 0) -> Any:
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, db=db, socket_timeout=10)

    def ping(self) -> bool:
        if not self.alive:
            raise RuntimeError(f"redis-server exited:\n{self.log_text()[-2000:]}")
        try:
            return bool(self.client().ping())
        except Exception:
            return False

    def flush(self) -> None:
        self.client().flushall()


def celery_executor_config(redis: RedisServer) -> dict[str, Any]:
    """The `celery_executor` config the runs and the workers share (`-y` reads the same YAML).

    dagster-celery sets neither `task_acks_late` nor `task_reject_on_worker_lost` (Celery's
    defaults are False: a message is acknowledged as the step starts, and a killed pool process
    fails the step); a deployment that wants a step re-delivered when its worker dies turns
    both on, and that is the configuration whose re-delivery the ledger must make safe.
    """
    return {
        "broker": redis.url(0),
        "backend": redis.url(1),
        "config_source": {
            "task_acks_late": True,
            "task_reject_on_worker_lost": True,
            "worker_prefetch_multiplier": 1,
        },
    }


def write_celery_yaml(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump({"execution": {"config": config}}))
    return path


class CeleryWorker(Service):
    """`dagster-celery worker start -A dagster_celery.app -y <yaml> -- --concurrency=1`.

    With `namespace=True` it runs under `unshare --pid --fork --mount-proc`: its processes see
    their own PID namespace (another container, as far as the ledger's process identity can
    tell). The worker's own tree: the CLI, celery's main process, one pool child.
    """

    def __init__(self, name: str, root: Path, config_yaml: Path, *, namespace: bool = False):
        super().__init__(name, root)
        self.config_yaml = config_yaml
        self.namespace = namespace

    def start(
        self, env: dict[str, str], queues: Sequence[str] = (), includes: Sequence[str] = ()
    ) -> CeleryWorker:
        """`includes`: modules the worker imports before it forks its pool (the job code), so
        the first step does not pay for the imports."""
        cmd = [
            _tool("dagster-celery"),
            "worker",
            "start",
            "-A",
            "dagster_celery.app",
            "-y",
            str(self.config_yaml),
            "-n",
            self.name,
            "-l",
            "INFO",
        ]
        for queue in queues:
            cmd += ["-q", queue]
        for module in includes:
            cmd += ["-i", module]
        cmd += ["--", "--concurrency=1", "--pool=prefork", "--without-gossip", "--without-mingle"]
        if self.namespace:
            cmd = ["unshare", "--pid", "--fork", "--mount-proc", *cmd]
        # `dagster-celery worker start` runs `celery` from PATH: this environment's, as an
        # activated virtualenv would have it
        bindir = str(Path(sys.executable).parent)
        env = {**env, "PATH": os.pathsep.join(p for p in (bindir, env.get("PATH")) if p)}
        self.spawn(cmd, env)
        wait_for(self.ready, f"celery worker {self.name} to be ready", START_TIMEOUT)
        return self

    def ready(self) -> bool:
        if not self.alive:
            raise RuntimeError(f"celery worker {self.name} exited:\n{self.log_text()[-4000:]}")
        return f"{self.name}@" in self.log_text() and " ready." in self.log_text()

    @property
    def hostname(self) -> str:
        import socket

        return f"{self.name}@{socket.gethostname()}"


class DaskCluster:
    """`dask scheduler` and single-thread `dask worker`s (no nanny: a killed worker stays dead)."""

    def __init__(self, root: Path, workers: int = 2) -> None:
        self.root = root
        self.port = free_port()
        self.scheduler = Service("dask-scheduler", root)
        self.workers = [Service(f"dask-worker-{i}", root) for i in range(workers)]

    @property
    def address(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def start(self, env: dict[str, str]) -> DaskCluster:
        dask = _tool("dask")
        self.scheduler.spawn(
            [dask, "scheduler", "--host", "127.0.0.1", "--port", str(self.port), "--no-dashboard"],
            env,
        )
        for worker in self.workers:
            self.start_worker(worker, env)
        wait_for(
            lambda: self.worker_count() >= len(self.workers),
            "the dask workers to register",
            START_TIMEOUT,
        )
        return self

    def start_worker(self, worker: Service, env: dict[str, str]) -> None:
        worker.spawn(
            [
                _tool("dask"),
                "worker",
                self.address,
                "--host",
                "127.0.0.1",
                "--nthreads",
                "1",
                "--no-nanny",
                "--no-dashboard",
                "--name",
                worker.name,
            ],
            env,
        )

    def worker_count(self) -> int:
        from distributed import Client

        try:
            with Client(self.address, timeout=10) as client:
                return len(client.scheduler_info()["workers"])
        except OSError:
            return 0

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()
        self.scheduler.stop()


def process_children(pid: int) -> list[int]:
    """Direct children of `pid`, from /proc (this PID namespace's view)."""
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == pid:
            children.append(int(entry))
    return children


def host_pid(ns_inode: int, ns_pid: int) -> int:
    """The pid (in this namespace) of the process that is `ns_pid` in PID namespace `ns_inode`."""
    if os.stat("/proc/self/ns/pid").st_ino == ns_inode:
        return ns_pid
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}/ns/pid").st_ino != ns_inode:
                continue
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("NSpid:") and int(line.split()[-1]) == ns_pid:
                return int(entry)
    raise LookupError(f"no process {ns_pid} in PID namespace {ns_inode}")


def scratch(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))
