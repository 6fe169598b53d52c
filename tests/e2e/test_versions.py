"""Model versions in a real cluster: an edge and two centrals as `dsnode serve` processes, the centrals
serving two versions of the bundled MoE (the same weights saved twice into the model store, with
different labels). The tests run in file order, each leaving the cluster as the next expects:

versions visible → a 90/10 split exact over 1000 unsticky requests → 200 sticky users on one version
each → the canary made to fail (30% injected errors) is rolled back, no client request failing →
central-1 reloaded onto the other version under 20 streaming clients, nothing dropped.
"""

from __future__ import annotations

import http.client
import json
import shutil
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from dsnode.cli import main
from dsnode.cluster.split import sticky_pick

from tests.support.nodes import ServeProcess, free_port, node_toml, running_cluster, wait_until

pytestmark = pytest.mark.slow

MODEL = "deepseek-r1-tiny"
BASE, CANARY = "2026-11", "2026-12"
SHARES = ((BASE, 90), (CANARY, 10))
HANG_GUARD_S = 180.0  # a safety net against hangs, never a measurement


def pull_version(moe_dir: Path, work: Path, store: Path, label: str) -> str:
    """The bundled MoE into the store as a version labelled `label` (a notes file makes it differ)."""
    folder = work / f"moe-{label}"
    shutil.copytree(moe_dir, folder)
    (folder / "RELEASE.md").write_text(f"tiny MoE, release {label}\n")
    assert main(["models", "pull", str(folder), "--name", "tiny-moe", "--label", label, "--store", str(store),
                 "--quiet", "--config", str(work / "no-such.toml")]) == 0
    return next(p.name for p in (store / "tiny-moe").iterdir()
                if p.is_dir() and not p.is_symlink() and label in (p / "RELEASE.md").read_text())


def central_toml(name: str, port: int, store: Path, label: str, debug: str = "") -> str:
    extra = f'\n[store]\nroot = "{store}"\n' + (f"\n[debug]\n{debug}\n" if debug else "")
    return node_toml(name, "central", port, MODEL, f"tiny-moe@{label}", "transformers", extra=extra)  # type: ignore[arg-type]


def edge_toml(port: int, dense_dir: Path, centrals: list[ServeProcess]) -> str:
    upstreams = "".join(f'\n[[routing.upstream]]\nurl = "{c.url}"\n' for c in centrals)
    routing = f"""[routing]
long_prompt_tokens = 32
poll_interval = 0.5
poll_timeout = 5
first_token_timeout = 60
{upstreams}
[routing.split.{MODEL}]
"{BASE}" = 90
"{CANARY}" = 10

[routing.canary]
window = 40
min_requests = 20
error_rate_margin = 0.1
ttft_p95_margin = 100.0   # errors are what this test judges: latency on a busy 2-core machine is noise
tpot_p95_margin = 100.0
"""
    return node_toml("edge-1", "edge", port, "tiny-edge", dense_dir, "transformers", extra=routing)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, dense_dir, moe_dir):
    work = tmp_path_factory.mktemp("versions")
    store = work / "store"
    ids = {label: pull_version(moe_dir, work, store, label) for label in (BASE, CANARY)}
    ports = [free_port() for _ in range(3)]
    centrals = []
    for name, port, label in (("central-1", ports[0], BASE), ("central-2", ports[1], CANARY)):
        config = work / f"{name}.toml"
        config.write_text(central_toml(name, port, store, label))
        centrals.append(ServeProcess(name, config, port, work / f"{name}.log"))
    edge_config = work / "edge.toml"
    edge_config.write_text(edge_toml(ports[2], dense_dir, centrals))
    edge = ServeProcess("edge-1", edge_config, ports[2], work / "edge.log")
    with running_cluster(centrals, edge, HANG_GUARD_S) as codes:
        yield {"edge": edge, "central-1": centrals[0], "central-2": centrals[1], "ids": ids, "store": store}
    assert codes == [0, 0, 0], "\n".join(node.log_tail() for node in [*centrals, edge])


# --- helpers ---------------------------------------------------------------------------------------
def _reload(node: ServeProcess, text: str, done_event: str) -> None:
    before = len(node.log_events(done_event))
    node.config_path.write_text(text)
    node.signal(signal.SIGHUP)
    wait_until(lambda: len(node.log_events(done_event)) > before, f"{node.name}: {done_event}", HANG_GUARD_S)


class Client:
    """Completions over one keep-alive connection: (status, version header, body)."""

    def __init__(self, node: ServeProcess) -> None:
        self.connection = http.client.HTTPConnection("127.0.0.1", node.port, timeout=120)

    def complete(self, **extra) -> tuple[int, str | None, bytes]:
        body = json.dumps({"model": MODEL, "prompt": "Hello", "max_tokens": 1, "temperature": 0, **extra})
        self.connection.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        response = self.connection.getresponse()
        return response.status, response.getheader("X-DSNode-Version"), response.read()


def _in_threads(count: int, work) -> list:
    """`work(i)` in `count` threads; their results, in order."""
    results: list = [None] * count
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = work(i)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(HANG_GUARD_S)
    assert not errors, errors
    return results


# --- the tests, in order ---------------------------------------------------------------------------
def test_every_node_says_which_version_it_serves(cluster, capsys):
    edge, ids = cluster["edge"], cluster["ids"]
    status, version, _ = Client(cluster["central-1"]).complete()
    assert (status, version) == (200, ids[BASE])
    models = {m["id"]: m for m in edge.get_json("/v1/models")["data"]}
    assert sorted((v["version"], v["label"], tuple(v["nodes"])) for v in models[MODEL]["dsnode"]["versions"]) == \
        sorted([(ids[BASE], BASE, ("central-1",)), (ids[CANARY], CANARY, ("central-2",))])
    assert main(["status", "--url", edge.url]) == 0
    table = capsys.readouterr().out
    assert f"{ids[BASE]} ({BASE})" in table and f"{ids[CANARY]} ({CANARY})" in table and "baseline" in table
    status, version, _ = Client(edge).complete()
    assert status == 200 and version in (ids[BASE], ids[CANARY])
    wait_until(lambda: any(r.get("version") == version and r.get("split") == "shares"
                           for r in edge.request_records().values()), "the edge's request record", HANG_GUARD_S)
    metrics = http.client.HTTPConnection("127.0.0.1", edge.port, timeout=30)
    metrics.request("GET", "/metrics")
    text = metrics.getresponse().read().decode()
    assert f'route="forwarded",status="200",version="{version}"' in text


def test_a_90_10_split_is_exact_over_1000_unsticky_requests(cluster):
    edge, ids = cluster["edge"], cluster["ids"]

    def send(_: int) -> Counter:
        client, seen = Client(edge), Counter()
        for _ in range(250):
            status, version, body = client.complete()
            assert status == 200, body
            seen[version] += 1
        return seen

    total = sum(_in_threads(4, send), Counter())
    assert total == {ids[BASE]: 900, ids[CANARY]: 100}


def test_200_sticky_users_each_stay_on_one_version(cluster):
    edge, ids = cluster["edge"], cluster["ids"]
    users = [f"user-{i}" for i in range(200)]

    def send(part: int) -> dict[str, set]:
        client, seen = Client(edge), {}
        for user in users[part::4]:
            for _ in range(2):
                status, version, body = client.complete(user=user)
                assert status == 200, body
                seen.setdefault(user, set()).add(version)
        return seen

    seen = {user: versions for part in _in_threads(4, send) for user, versions in part.items()}
    assert all(len(versions) == 1 for versions in seen.values())
    want = {user: ids[sticky_pick(SHARES, MODEL, user)] for user in users}
    assert {user: next(iter(versions)) for user, versions in seen.items()} == want
    assert set(want.values()) == {ids[BASE], ids[CANARY]}


def test_a_failing_canary_is_rolled_back_and_no_client_request_fails(cluster, capsys):
    edge, canary, ids = cluster["edge"], cluster["central-2"], cluster["ids"]
    _reload(canary, central_toml("central-2", canary.port, cluster["store"], CANARY, "inject_errors = 0.3"),
            "config_reloaded")
    assert main(["canary", "reset", MODEL, "--url", edge.url]) == 0  # fresh windows for the verdict
    client, versions = Client(edge), Counter()
    for _ in range(400):  # the canary gets every 10th: its 20th (min_requests) is the 200th request
        status, version, body = client.complete()
        assert status == 200, body  # the canary's failures were answered by the baseline
        versions[version] += 1
    [event] = edge.log_events("canary_rolled_back")
    assert (event["model"], event["version"], event["baseline"], event["by"]) == (MODEL, CANARY, BASE, "automatic")
    assert (event["canary"]["requests"], event["canary"]["errors"]) == (20, 6)  # within the window of 40
    assert event["baseline_figures"]["errors"] == 0 and event["baseline_figures"]["requests"] >= 20
    assert versions == {ids[BASE]: 386, ids[CANARY]: 14}  # 20 canary picks, 6 failed and retried; then none
    metrics = http.client.HTTPConnection("127.0.0.1", edge.port, timeout=30)
    metrics.request("GET", "/metrics")
    text = metrics.getresponse().read().decode()
    assert f'dsnode_canary_rollbacks_total{{model="{MODEL}",version="{CANARY}"}} 1.0' in text
    assert f'dsnode_version_share_percent{{model="{MODEL}",version="{CANARY}"}} 0.0' in text
    assert main(["status", "--url", edge.url]) == 0
    shown = capsys.readouterr().out
    assert "rolled back" in shown and f"{MODEL} {CANARY}: rolled back (automatic)" in shown
    assert "error rate 30.0% > baseline 0.0% + margin 10.0%" in shown


def test_a_reload_onto_another_version_under_20_streaming_clients_drops_nothing(cluster):
    central, ids = cluster["central-1"], cluster["ids"]
    old, new = ids[BASE], ids[CANARY]
    stop, lock = threading.Event(), threading.Lock()
    answers: list[tuple[int, float, float, str | None]] = []  # client, sent, headers received, version

    def stream(client: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", central.port, timeout=120)
        body = json.dumps({"model": MODEL, "prompt": "Hello", "max_tokens": 4, "stream": True})
        while not stop.is_set():
            sent = time.monotonic()
            connection.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
            response = connection.getresponse()
            received = time.monotonic()
            text = response.read().decode()
            assert response.status == 200 and text.endswith("data: [DONE]\n\n") and '"error"' not in text, text
            with lock:
                answers.append((client, sent, received, response.getheader("X-DSNode-Version")))

    def count(version: str) -> int:
        with lock:
            return sum(a[3] == version for a in answers)

    runner = threading.Thread(target=lambda: _in_threads(20, stream))
    runner.start()
    try:
        wait_until(lambda: count(old) >= 40, "the clients under way", HANG_GUARD_S)
        text = central.config_path.read_text().replace(f"tiny-moe@{BASE}", f"tiny-moe@{CANARY}")
        _reload(central, text, "model_switched")
        wait_until(lambda: count(new) >= 40, "answers from the new version", HANG_GUARD_S)
    finally:
        stop.set()
        runner.join(HANG_GUARD_S)
    assert not runner.is_alive()
    assert {a[3] for a in answers} == {old, new} and len(answers) == count(old) + count(new)
    for client in range(20):  # each client: the old version, then the new one, never back
        seen = [v for c, _, _, v in sorted(answers, key=lambda a: a[1]) if c == client]
        assert seen == sorted(seen, key=lambda v: v == new), (client, seen)
    # one point in time: no request sent after the first new answer arrived got the old version
    first_new = min(received for _, _, received, v in answers if v == new)
    assert all(v == new for _, sent, _, v in answers if sent > first_new)
    [started] = central.log_events("model_switch_started")
    assert started["mode"] == "beside" and started["version"] == f"{new} ({CANARY})"
