"""The tensor-parallel worker processes of one node: start them, watch them, stop them.

One `dsnode serve` starts `world_size` processes (`python -m dsnode.central.tp_worker`), so the
operator still runs a single systemd service. Rank 0 gets a control socket to the daemon; the other
ranks only talk to rank 0, through torch.distributed.

A watcher thread owns the processes: it starts them (so `PR_SET_PDEATHSIG`, which the workers set,
fires when *it* ends, i.e. with the daemon) and polls them. When a rank exits while the group is not
being stopped, the watcher kills the others at once (they would wait forever in a collective),
records why, and calls `on_death(reason)`. In a group of hosts a rank's exit is often the effect of
another host leaving (its collective broke): when `ending_elsewhere()` says that host's account is on
its way (its link is closed), the watcher gives it `ELSEWHERE_GRACE_S` to arrive through `end`, so the
death is reported with its cause, not as "rank 0 exited with code 1".
"""

from __future__ import annotations

import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Callable

import structlog

log = structlog.get_logger("dsnode.central")

POLL_S = 0.1  # how often the watcher looks at the processes
STOP_TIMEOUT_S = 15.0  # a rank asked to close gets this long before it is killed
# Under the 1 s that a runner call waits for the death's account (`RemoteRunner._send`), which would
# otherwise report the closed control socket instead
ELSEWHERE_GRACE_S = 0.5


class RankStartError(Exception):
    pass


@dataclass
class RankGroup:
    """`command(rank)` is the argv of a local rank; `env(rank)` its environment; local rank 0 also
    gets `--control-fd N`, its end of the control socket. With `[distributed]`, this host's ranks
    are global ranks `first_rank` .. `first_rank + world_size - 1` of the group."""

    world_size: int  # ranks on this host
    command: Callable[[int], list[str]]
    env: Callable[[int], dict[str, str]]
    on_death: Callable[[str], None]
    first_rank: int = 0
    ending_elsewhere: Callable[[], bool] = lambda: False  # another host left; its `end` is coming
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    dead_reason: str | None = None
    _stopping: threading.Event = field(default_factory=threading.Event)
    _dead: threading.Event = field(default_factory=threading.Event)
    _started: threading.Event = field(default_factory=threading.Event)
    _start_error: BaseException | None = None
    _control: Connection | None = None
    _thread: threading.Thread | None = None
    _death_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def start(self) -> Connection:
        """Start every rank; returns the daemon's end of rank 0's control socket."""
        if self._stopping.is_set():
            raise RankStartError("the engine was closed before its ranks started")
        self._thread = threading.Thread(target=self._own, name="dsnode-ranks", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._start_error is not None:
            raise RankStartError(f"could not start the tensor-parallel ranks: {self._start_error}")
        assert self._control is not None
        return self._control

    def wait_dead(self, timeout: float) -> str | None:
        """The death reason, waiting up to `timeout` for the watcher to notice one."""
        self._dead.wait(timeout)
        return self.dead_reason

    def expect_exit(self) -> None:
        """The ranks are about to be asked to close: their exits are no longer deaths."""
        self._stopping.set()

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """After the caller asked rank 0 to close: wait for every rank, kill the ones left."""
        self._stopping.set()
        for process in self.processes:
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("rank_kill", pid=process.pid, why=f"still running {timeout}s after close")
                process.kill()
        self._join()

    def kill(self) -> None:
        self._stopping.set()
        self._kill_all()
        self._join()

    def end(self, reason: str) -> None:
        """Something outside these ranks ended the group (another host left it): kill them, and
        report it as their death, with that reason."""
        if self._claim_death(reason):
            self._kill_all()
            self._dead.set()
            self.on_death(reason)
        else:
            self._kill_all()

    # --- the watcher thread ---------------------------------------------------------------------
    def _own(self) -> None:
        try:
            self._spawn()
        except BaseException as exc:  # reported by start(); nothing else runs in this thread
            self._start_error = exc
            self._kill_all()
            return
        finally:
            self._started.set()
        self._watch()

    def _spawn(self) -> None:
        daemon_end, rank0_end = socket.socketpair()
        try:
            for rank in range(self.world_size):
                argv = self.command(rank)
                pass_fds: tuple[int, ...] = ()
                if rank == 0:
                    argv = [*argv, "--control-fd", str(rank0_end.fileno())]
                    pass_fds = (rank0_end.fileno(),)
                # stdout → our stderr: DeepSpeed prints to stdout, which is the daemon's JSON log
                process = subprocess.Popen(argv, env=self.env(rank), pass_fds=pass_fds, stdout=2)
                self.processes.append(process)
                log.info("rank_started", rank=self.first_rank + rank, pid=process.pid,
                         local_ranks=self.world_size)
        except BaseException:
            daemon_end.close()
            raise
        finally:
            rank0_end.close()
        self._control = Connection(daemon_end.detach())

    def _watch(self) -> None:
        """Until every rank has exited; this thread must outlive them (their PR_SET_PDEATHSIG)."""
        while True:
            running = [p for p in self.processes if p.poll() is None]
            if not self._stopping.is_set() and len(running) < len(self.processes):
                self._died()
                continue
            if running and self._dead.is_set():  # ended from outside while still spawning
                self._kill_all()
                continue
            if not running:
                return
            time.sleep(POLL_S)

    def _died(self) -> None:
        if self.ending_elsewhere() and self._dead.wait(ELSEWHERE_GRACE_S):
            return  # `end` reported the death, with the other host's reason
        exited = [(self.first_rank + rank, p) for rank, p in enumerate(self.processes)
                  if p.poll() is not None]
        # a signal is a cause; an exit code is often the effect (a peer's broken collective)
        exited.sort(key=lambda rp: (rp[1].returncode or 0) >= 0)
        reason = "; ".join(f"tensor-parallel rank {rank} (pid {p.pid}) {_how(p.returncode)}"
                           for rank, p in exited)
        if not self._claim_death(reason):
            return
        self._kill_all()
        self._dead.set()
        for rank, p in exited:
            log.error("rank_died", rank=rank, pid=p.pid, returncode=p.returncode)
        self.on_death(self.dead_reason)

    def _claim_death(self, reason: str) -> bool:
        """True for the first death only; from then on, exits are ours."""
        with self._death_lock:
            if self.dead_reason is not None or self._stopping.is_set():
                self._stopping.set()
                return False
            self.dead_reason = reason
            self._stopping.set()
            return True

    def _kill_all(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
        for process in self.processes:
            process.wait()

    def _join(self) -> None:
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()


def _how(returncode: int | None) -> str:
    if returncode is None:
        return "is unresponsive"
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"


def free_port() -> int:
    """A TCP port for torch.distributed's rendezvous on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def worker_env(base: dict[str, str], rank: int, world_size: int, port: int, extra: dict[str, str]) -> dict[str, str]:
    """torch.distributed's environment contract for one rank on this host."""
    return {
        **base,
        **extra,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size),
    }
