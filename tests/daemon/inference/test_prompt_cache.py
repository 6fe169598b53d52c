"""The prompt cache's bookkeeping: longest shared prefix in whole blocks, the last token always left
to feed, a conversation's turns kept once, the byte capacity held by evicting the least recently used."""

from __future__ import annotations

import numpy as np
import pytest
from dsnode.inference.prompt_cache import (
    BLOCK,
    PrefixReuse,
    PromptCache,
    Segment,
    check_host_memory,
    common_prefix,
)
from dsnode.sizing import DoesNotFit, prompt_cache_verdict
from structlog.testing import capture_logs


def tokens(n: int, start: int = 0) -> list[int]:
    return list(range(start, start + n))


def test_the_longest_shared_prefix_wins_in_whole_blocks():
    cache: PromptCache[str] = PromptCache(10_000)
    assert cache.add(tokens(40), 40, "", lambda: "forty")
    assert cache.add(tokens(20) + tokens(30, 500), 50, "", lambda: "twenty")
    hit = cache.lookup(tokens(37) + [9999])  # shares 37 with "forty", 20 with "twenty"
    assert hit is not None and hit.entry.payload == "forty" and hit.reused == 2 * BLOCK
    hit = cache.lookup(tokens(20) + tokens(5, 500))  # 25 with "twenty", 20 with "forty": one block each
    assert hit is not None and hit.reused == BLOCK
    assert cache.lookup(tokens(BLOCK - 1) + [9999]) is None  # less than a block
    assert cache.lookup([9999] + tokens(60)) is None  # the first token differs


def test_the_prompts_last_token_is_never_reused():
    cache: PromptCache[str] = PromptCache(10_000)
    cache.add(tokens(64), 64, "", lambda: "whole")
    assert cache.lookup(tokens(64)).reused == 48  # 63 may be reused: three whole blocks of them
    assert cache.lookup(tokens(65)).reused == 64
    assert cache.lookup(tokens(BLOCK)) is None


def test_a_longer_turn_replaces_the_entries_it_holds_and_a_held_one_is_not_added():
    cache: PromptCache[str] = PromptCache(10_000)
    cache.add(tokens(30), 30, "", lambda: "turn 1")
    cache.add(tokens(20, 100), 20, "", lambda: "elsewhere")
    assert cache.add(tokens(50), 50, "", lambda: "turn 2")
    assert len(cache) == 2 and cache.nbytes == 70
    assert not cache.wants(tokens(45), 45) and not cache.add(tokens(45), 45, "", lambda: "held")  # turn 2 holds it
    assert len(cache) == 2 and cache.nbytes == 70


def test_capacity_evicts_the_least_recently_used_and_refuses_what_cannot_fit():
    cache: PromptCache[str] = PromptCache(100)
    for i, start in enumerate((0, 1000, 2000)):
        cache.add(tokens(BLOCK, start), 30, "", lambda i=i: f"entry {i}")
    cache.lookup(tokens(BLOCK) + [1])  # entry 0 used: entry 1 is now the oldest
    cache.add(tokens(BLOCK, 3000), 30, "", lambda: "entry 3")
    assert cache.nbytes == 90 and cache.lookup(tokens(BLOCK, 1000) + [1]) is None
    assert cache.lookup(tokens(BLOCK) + [1]) is not None
    assert not cache.add(tokens(BLOCK, 4000), 101, "", lambda: "too big") and cache.nbytes == 90
    assert not PromptCache(0).wants(tokens(64), 1)  # capacity 0: off


def test_a_scope_sees_only_its_own_entries_and_keeps_its_own_copy():
    cache: PromptCache[str] = PromptCache(10_000)
    cache.add(tokens(40), 40, "alice", lambda: "alice's")
    assert cache.lookup(tokens(40) + [1], scope="bob") is None and cache.lookup(tokens(40) + [1]) is None
    assert cache.lookup(tokens(40) + [1], scope="alice").entry.payload == "alice's"
    assert cache.wants(tokens(30), 30, scope="bob")  # alice's entry holds these tokens, not for bob
    assert cache.add(tokens(50), 50, "bob", lambda: "bob's") and len(cache) == 2  # alice's stays
    assert cache.lookup(tokens(60), scope="alice").entry.payload == "alice's"


@pytest.mark.parametrize(("a", "b", "shared"), [([], [1], 0), ([1, 2, 3], [1, 2, 3], 3), ([1, 2, 3], [1, 2], 2),
                                                ([1, 5, 3], [1, 2, 3], 1), ([4], [1], 0)])
def test_common_prefix(a, b, shared):
    assert common_prefix(np.asarray(a, np.int64), np.asarray(b, np.int64)) == shared


class Copies:
    """A runner's copies, as (start, end) ranges of the sequence they were made of."""

    def __init__(self) -> None:
        self.made: list[tuple[str, int, int]] = []

    def of(self, seq_id: str):
        return lambda start, end: self.made.append((seq_id, start, end)) or f"{seq_id}[{start}:{end}]"


def test_a_runners_side_keeps_only_what_a_looked_up_sequence_computed():
    reuse: PrefixReuse[str] = PrefixReuse(10_000)
    copies = Copies()
    reuse.released("never looked up", tokens(40), 1, copies.of("x"))  # whose would it be? not kept
    assert copies.made == [] and len(reuse.cache) == 0
    assert reuse.lookup("a", tokens(40), "alice", has_cache=False) == 0
    reuse.released("a", tokens(40), 1, copies.of("a"))
    assert copies.made == [("a", 0, 40)] and len(reuse.cache) == 1
    reuse.cache.add(tokens(30), 30, "alice", lambda: copies.made.append("never"))  # held already: no copy
    assert copies.made == [("a", 0, 40)] and len(reuse.cache) == 1
    assert reuse.lookup("b", tokens(40) + [1], "alice", has_cache=False) == 32
    assert reuse.lookup("b", tokens(40) + [1], "alice", has_cache=False) == 0  # asked twice: once
    reuse.released("b", tokens(40) + [1], 1, copies.of("b"))  # dropped before its prefix was copied in
    assert copies.made == [("a", 0, 40)]
    assert reuse.lookup("c", tokens(40) + [1], "alice", has_cache=True) == 0  # it has a cache already
    assert reuse.lookup("d", tokens(40) + [1], "alice", has_cache=False) == 32
    [(seq, first, segments)] = reuse.take_pending()
    assert (seq, first) == ("d", tokens(32)) and reuse.take_pending() == []
    assert segments == (Segment(0, 32, "a[0:40]"),)  # a's copy, cut at what d takes
    assert PrefixReuse(0).lookup("x", tokens(40), "", has_cache=False) == 0  # off


def test_a_conversations_next_turn_copies_only_the_turn():
    """Each turn's entry is the segments its sequence took plus a copy of what it computed after them:
    the copies made over a conversation add up to its length once, not once per turn."""
    reuse: PrefixReuse[str] = PrefixReuse(10_000)
    copies = Copies()
    history = tokens(40)
    reuse.lookup("turn 1", history, "", has_cache=False)
    reuse.released("turn 1", history, 1, copies.of("turn 1"))
    for turn in (2, 3):
        history = history + tokens(30, 100 * turn)
        reused = reuse.lookup(f"turn {turn}", history, "", has_cache=False)
        [(_, first, segments)] = reuse.take_pending()
        assert len(first) == reused == {2: 32, 3: 64}[turn]  # whole blocks of what the last turn held
        reuse.released(f"turn {turn}", history, 1, copies.of(f"turn {turn}"))
    assert [(seq, start, end) for seq, start, end in copies.made] == [("turn 1", 0, 40), ("turn 2", 32, 70),
                                                                        ("turn 3", 64, 100)]
    [entry] = list(reuse.cache._entries.values())  # each turn replaced the one before
    assert [(s.start, s.end, s.part) for s in entry.payload] == [(0, 32, "turn 1[0:40]"), (32, 64, "turn 2[32:70]"),
                                                                  (64, 100, "turn 3[64:100]")]
    assert entry.nbytes == 100  # counted whole: the entries it replaced are gone


def test_a_sequence_kept_while_it_runs_copies_the_rest_at_its_end():
    """`offer` mid-run (a prompt kept for other choices): its release then copies only what came after."""
    reuse: PrefixReuse[str] = PrefixReuse(10_000)
    copies = Copies()
    reuse.lookup("lead", tokens(50), "", has_cache=False)
    reuse.offer("lead", tokens(50), reuse.keeps("lead"), 1, copies.of("lead"))
    reuse.released("lead", tokens(58), 1, copies.of("lead"))
    assert copies.made == [("lead", 0, 50), ("lead", 50, 58)]
    assert reuse.took == {}


# --- host memory ------------------------------------------------------------------------------------
GIB = 2**30


@pytest.mark.parametrize("cache_mb, ranks, verdict", [
    (1024, 1, "ok"),  # the default on a 24 GiB host: 4%
    (4096, 8, "refuse"),  # configs/central.toml's per-rank figure, 8 ranks: 32 GiB of 24
    (4096, 2, "ok"),  # 8 GiB: 33%
    (4096, 3, "warn"),  # 12 GiB: 50%
    (18 * 1024, 1, "refuse"),  # 75%
    (0, 8, "ok"),  # no cache
])
def test_the_prompt_cache_is_refused_over_70_percent_of_the_host_and_warned_of_over_40(cache_mb, ranks, verdict):
    got, why = prompt_cache_verdict(cache_mb, ranks, 24 * GIB)
    assert got == verdict
    assert f"{cache_mb * ranks / (24 * 1024):.0%}" in why
    if got == "refuse":
        assert why.startswith(f"batching.prompt_cache_mb = {cache_mb}:")
        assert (f"{ranks} ranks x {cache_mb} MB" if ranks > 1 else f"({cache_mb} MB)") in why


def test_a_start_with_too_large_a_prompt_cache_is_refused_with_exit_78(monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setattr("dsnode.inference.prompt_cache.psutil.virtual_memory", lambda: SimpleNamespace(total=8 * GIB))
    with pytest.raises(DoesNotFit, match="prompt_cache_mb = 6144") as info:
        check_host_memory(6144)
    assert info.value.exit_code == 78
    with capture_logs() as logs:
        check_host_memory(4096)  # 50%: served, with a warning
        check_host_memory(1024)
    assert [e["event"] for e in logs] == ["prompt_cache_large"]
