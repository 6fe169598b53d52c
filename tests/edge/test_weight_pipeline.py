"""WeightPipeline: weights prepared ahead of the builder, handed over in the builder's order."""

from __future__ import annotations

import threading
import time

import pytest
from dsnode.edge.weight_pipeline import WeightPipeline, auto_threads


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_the_weights_come_back_in_order_prepared_once_each(threads):
    prepared: list[str] = []
    lock = threading.Lock()

    def prepare(key: str) -> str:
        time.sleep(0.01 if key == "a" else 0.0)  # the first one finishes last
        with lock:
            prepared.append(key)
        return key.upper()

    pipeline = WeightPipeline(["a", "b", "c", "d", "e"], prepare, threads)
    try:
        assert [pipeline.take(k) for k in "abcde"] == list("ABCDE")
    finally:
        pipeline.close()
    assert sorted(prepared) == list("abcde")


def test_one_thread_prepares_each_weight_when_it_is_taken_in_the_callers_thread():
    seen: list[tuple[str, str]] = []
    pipeline = WeightPipeline(["a", "b"], lambda k: seen.append((k, threading.current_thread().name)), 1)
    assert seen == []
    pipeline.take("a")
    assert seen == [("a", threading.current_thread().name)]
    pipeline.close()


def test_no_more_than_threads_weights_are_ahead_of_the_builder():
    running, most = 0, 0
    lock = threading.Lock()

    def prepare(key: int) -> int:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.005)
        with lock:
            running -= 1
        return key

    started: list[int] = []
    pipeline = WeightPipeline(list(range(12)), lambda k: started.append(k) or prepare(k), 3)
    try:
        for key in range(12):
            time.sleep(0.01)  # a slow builder: the pool must not run ahead of it
            assert len(started) <= key + 3
            assert pipeline.take(key) == key
    finally:
        pipeline.close()
    assert most <= 3


def test_asking_out_of_order_is_an_error_naming_both():
    pipeline = WeightPipeline([("q", "k", "v"), ("o",)], lambda k: k, 2)
    try:
        with pytest.raises(RuntimeError, match=r"asked for \('o',\); the next prepared weight is \('q', 'k', 'v'\)"):
            pipeline.take(("o",))
        pipeline.take(("q", "k", "v"))
        pipeline.take(("o",))
        with pytest.raises(RuntimeError, match="nothing more"):
            pipeline.take(("o",))
    finally:
        pipeline.close()


def test_a_failure_reaches_the_builder_and_close_stops_the_rest():
    prepared: list[int] = []

    def prepare(key: int) -> int:
        if key == 1:
            raise ValueError("weight 1 is unreadable")
        time.sleep(0.02)
        prepared.append(key)
        return key

    pipeline = WeightPipeline(list(range(50)), prepare, 2)
    assert pipeline.take(0) == 0
    with pytest.raises(ValueError, match="weight 1 is unreadable"):
        pipeline.take(1)
    pipeline.close()
    assert len(prepared) < 10  # what had not started was cancelled
    assert not [t for t in threading.enumerate() if t.name.startswith("dsnode-convert")]


def test_the_default_is_one_thread_per_core_up_to_four(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert auto_threads() == 4
    monkeypatch.setattr("os.cpu_count", lambda: None)
    assert auto_threads() == 1
    with pytest.raises(ValueError, match="at least 1"):
        WeightPipeline([], lambda k: k, 0)
