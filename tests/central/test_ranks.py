"""RankGroup's account of a death: real processes (no torch), the watcher thread as the daemon runs it."""

from __future__ import annotations

import sys
import threading
import time

from dsnode.central import ranks as ranks_module
from dsnode.central.ranks import RankGroup

EXIT_SOON = [sys.executable, "-c", "import time; time.sleep(0.3); raise SystemExit(1)"]
CAUSE = "the group ended: host 1 (central-1) closed its link to this host (its daemon stopped or died)"


def group(deaths: list[str], ending_elsewhere=lambda: False) -> RankGroup:
    return RankGroup(1, command=lambda rank: EXIT_SOON, env=lambda rank: {}, on_death=deaths.append,
                     ending_elsewhere=ending_elsewhere)


def wait_for(deaths: list[str], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not deaths and time.monotonic() < deadline:
        time.sleep(0.01)


def test_a_rank_that_exits_on_its_own_is_the_reason():
    deaths: list[str] = []
    ranks = group(deaths)
    ranks.start().close()
    wait_for(deaths)
    assert deaths == [f"tensor-parallel rank 0 (pid {ranks.pids[0]}) exited with code 1"]
    assert ranks.dead_reason == deaths[0]
    ranks.kill()


def test_a_rank_that_exits_after_another_host_left_is_reported_as_that_host_leaving():
    """The leader's rank, its collective broken by a host that died, can exit before the link's reader
    thread has read that host's closed connection: the watcher waits for the link's account."""
    deaths: list[str] = []
    asked = threading.Event()

    def host_left() -> bool:
        asked.set()
        return True

    ranks = group(deaths, host_left)

    def link_reports_late() -> None:  # after the watcher has seen the exit, as a busy host's reader does
        asked.wait(10)
        time.sleep(0.1)
        ranks.end(CAUSE)

    reporter = threading.Thread(target=link_reports_late)
    ranks.start().close()
    reporter.start()
    wait_for(deaths)
    reporter.join(10)
    time.sleep(ranks_module.ELSEWHERE_GRACE_S)  # no second account comes after it
    assert deaths == [CAUSE] and ranks.dead_reason == CAUSE
    ranks.kill()


def test_a_closed_link_whose_account_never_comes_leaves_the_ranks_exit_as_the_reason():
    deaths: list[str] = []
    ranks = group(deaths, lambda: True)
    ranks.start().close()
    started = time.monotonic()
    wait_for(deaths)
    assert deaths == [f"tensor-parallel rank 0 (pid {ranks.pids[0]}) exited with code 1"]
    assert time.monotonic() - started >= 0.3 + ranks_module.ELSEWHERE_GRACE_S  # the rank sleeps 0.3 s
    ranks.kill()
