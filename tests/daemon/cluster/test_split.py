"""Which version a request gets (`dsnode.cluster.split`): sticky users, and exact shares for the rest."""

from __future__ import annotations

from collections import Counter

from dsnode.cluster.split import RoundRobin, sticky_pick, sticky_point

MODEL = "deepseek-r1"
SHARES = (("2026-11", 90), ("2026-12", 10))


def test_unsticky_requests_follow_the_shares_exactly():
    rotation = RoundRobin(SHARES)
    picks = [rotation.pick() for _ in range(1000)]
    assert Counter(picks) == {"2026-11": 900, "2026-12": 100}
    # and so does every run of 100 picks, wherever it starts (smooth: the canary's are spread out)
    for start in (0, 37, 455, 900):
        assert Counter(picks[start:start + 100]) == {"2026-11": 90, "2026-12": 10}
    assert max(len(run) for run in "".join("a" if p == "2026-11" else "b" for p in picks).split("b")) <= 10


def test_three_versions_and_odd_shares_are_exact_too():
    rotation = RoundRobin((("a", 33), ("b", 33), ("c", 34)))
    assert Counter(rotation.pick() for _ in range(300)) == {"a": 99, "b": 99, "c": 102}


def test_a_version_with_no_share_is_never_picked():
    rotation = RoundRobin((("a", 100), ("b", 0)))
    assert {rotation.pick() for _ in range(50)} == {"a"}
    assert RoundRobin((("a", 0),)).pick() is None


def test_a_user_always_gets_the_same_version_and_the_shares_hold_on_average():
    users = [f"user-{i}" for i in range(5000)]
    first = {u: sticky_pick(SHARES, MODEL, u) for u in users}
    assert all(sticky_pick(SHARES, MODEL, u) == first[u] for u in users)
    canary = sum(v == "2026-12" for v in first.values())
    assert 400 <= canary <= 600  # 10% of 5000, within a wide margin (the hash is not a rotation)


def test_sticky_slices_follow_the_configured_order_of_the_shares():
    """A point below 90% of the hash range is the first version's, at or above the second's."""
    users = [f"u{i}" for i in range(2000)]
    for user in users:
        below = sticky_point(MODEL, user) * 100 < 90 * 2**64
        assert sticky_pick(SHARES, MODEL, user) == ("2026-11" if below else "2026-12")


def test_a_rolled_back_canary_moves_only_its_own_users():
    users = [f"user-{i}" for i in range(2000)]
    before = {u: sticky_pick(SHARES, MODEL, u) for u in users}
    after = {u: sticky_pick((("2026-11", 100), ("2026-12", 0)), MODEL, u) for u in users}
    assert set(after.values()) == {"2026-11"}
    assert all(after[u] == before[u] for u in users if before[u] == "2026-11")


def test_the_same_user_may_get_different_versions_of_different_models():
    users = [f"user-{i}" for i in range(400)]
    a = [sticky_pick((("x", 50), ("y", 50)), "model-a", u) for u in users]
    b = [sticky_pick((("x", 50), ("y", 50)), "model-b", u) for u in users]
    assert a != b  # independent hashes per model


def test_no_share_at_all_picks_nothing():
    assert sticky_pick((("a", 0),), MODEL, "someone") is None
