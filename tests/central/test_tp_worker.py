"""The ranks' agreement on a prompt-cache lookup (`tp_worker._agreed_reuse`), in two real gloo processes:
the same answer is kept; different answers become 0 on every rank, each dropping its pending copy."""

from __future__ import annotations

import multiprocessing
import socket


class Runner:
    def __init__(self) -> None:
        self.released: list[str] = []

    def release(self, seq_id: str) -> None:
        self.released.append(seq_id)


def _rank(rank: int, port: int, answers: tuple[int, int], out: multiprocessing.Queue) -> None:
    import torch.distributed as dist
    from dsnode.central.tp_worker import _agreed_reuse

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    runner = Runner()
    try:
        out.put((rank, _agreed_reuse(runner, "s#0", answers[rank], None), runner.released))
    finally:
        dist.destroy_process_group()


def agree(answers: tuple[int, int]) -> dict[int, tuple[int, list[str]]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    ranks = [context.Process(target=_rank, args=(r, port, answers, out)) for r in (0, 1)]
    for p in ranks:
        p.start()
    results = {}
    for _ in ranks:
        rank, cached, released = out.get(timeout=120)
        results[rank] = (cached, released)
    for p in ranks:
        p.join(timeout=60)
        assert p.exitcode == 0
    return results


def test_ranks_that_agree_keep_the_prefix_and_ranks_that_differ_reuse_nothing():
    assert agree((32, 32)) == {0: (32, []), 1: (32, [])}
    assert agree((32, 16)) == {0: (0, ["s#0"]), 1: (0, ["s#0"])}
