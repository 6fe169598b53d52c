"""One model over two hosts, for real: two `dsnode serve` processes on loopback, each starting 2 CPU
ranks (gloo), form one 4-rank group (`[distributed]`) over the tiny DeepSeek-V3 with 18 routed
experts. Greedy tokens through the leader equal single-process transformers; started in either
order; a follower's rank killed, or the follower daemon killed, ends the leader's requests cleanly
and both daemons exit non-zero, and started again (as systemd would) they serve again. A follower
configured for another model or rank count is refused at the rendezvous, on both hosts; a leader
that never answers ends the follower after join_timeout."""

from __future__ import annotations

import contextlib
import io
import json
import re
import signal
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
from dsnode.cli import main

from tests.support.nodes import ServeProcess, free_port, node_toml

from . import tiny_moe
from .conftest import PROMPTS

pytestmark = pytest.mark.slow

MODEL = "deepseek-r1-tiny"
MAX_TOKENS = 16
READY_S = 240  # four ranks importing torch, DeepSpeed and transformers on two shared cores


def host_config(tmp_path: Path, index: int, ports: dict[str, int], folder: Path, model: str = MODEL,
                ranks: int = 2, join_timeout: float = 120.0, rendezvous: int | None = None) -> Path:
    text = node_toml(f"central-{index}", "central", ports[f"http{index}"], model, folder, "deepspeed",
                     model_extra='device = "cpu"\n', extra=f"""
[distributed]
hosts = 2
host_index = {index}
leader = "127.0.0.1:{rendezvous or ports['rendezvous']}"
ranks_per_host = {ranks}
join_timeout = {join_timeout}
""")
    path = tmp_path / f"host{index}-{model}-{ranks}.toml"
    path.write_text(text)
    return path


def start(tmp_path: Path, index: int, config: Path, ports: dict[str, int], run: str) -> ServeProcess:
    return ServeProcess(f"central-{index}", config, ports[f"http{index}"],
                        tmp_path / f"host{index}-{run}.log").start()


def post(url: str, body: dict, timeout: float = 120.0):
    request = urllib.request.Request(url + "/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    return urllib.request.urlopen(request, timeout=timeout)


def complete(url: str, prompt: str, max_tokens: int = MAX_TOKENS) -> str:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    with post(url, body) as response:
        assert response.headers["X-DSNode-Node"] == "central-0"  # the leader serves
        return json.load(response)["choices"][0]["text"]


def ranks_of(node: ServeProcess) -> list[psutil.Process]:
    children = psutil.Process(node.process.pid).children()
    return [p for p in children if "dsnode.central.tp_worker" in p.cmdline()]


def gone(processes: list[psutil.Process]) -> bool:
    return not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in processes)


@pytest.fixture(scope="module")
def v3_texts(v3):
    """The text the engine streams for the tokens single-process transformers generates (released
    by the engine's own detokenizer, which holds back a split UTF-8 character: random weights emit
    byte tokens)."""
    from dsnode.inference.detokenizer import Detokenizer
    from dsnode.inference.tokenizer import TextTokenizer

    folder, model = v3
    tokenizer = TextTokenizer.from_folder(folder)
    texts = {}
    for prompt in PROMPTS:
        detokenizer = Detokenizer(tokenizer)
        ids = tiny_moe.greedy(model, tokenizer.encode(prompt), MAX_TOKENS)
        texts[prompt] = "".join(detokenizer.push(t) for t in ids) + detokenizer.flush()
    return texts


@pytest.fixture
def ports():
    return {"http0": free_port(), "http1": free_port(), "rendezvous": free_port()}


def test_two_hosts_serve_one_model_and_reform_after_a_death(tmp_path, v3, v3_texts, ports):
    folder = v3[0]
    configs = [host_config(tmp_path, i, ports, folder) for i in (0, 1)]
    nodes: list[ServeProcess] = []
    try:
        # 1. the leader first, then the follower
        nodes = [start(tmp_path, 0, configs[0], ports, "a")]
        time.sleep(2)
        nodes.append(start(tmp_path, 1, configs[1], ports, "a"))
        leader, follower = (n.wait_ready(READY_S) for n in nodes)
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            texts = dict(zip(PROMPTS, pool.map(lambda p: complete(leader.url, p), PROMPTS)))
        assert texts == v3_texts
        _the_group_shows_on_both_hosts(leader, follower)
        _a_killed_follower_rank_ends_the_stream_and_both_daemons(leader, follower)

        # 2. started again, the follower first: they form the group again
        nodes = [start(tmp_path, 1, configs[1], ports, "b")]
        time.sleep(2)
        nodes.insert(0, start(tmp_path, 0, configs[0], ports, "b"))
        leader, follower = (n.wait_ready(READY_S) for n in nodes)
        assert complete(leader.url, PROMPTS[0]) == v3_texts[PROMPTS[0]]
        _a_killed_follower_daemon_ends_requests_cleanly(leader, follower)

        # 3. and once more, as systemd would after that
        nodes = [start(tmp_path, i, configs[i], ports, "c") for i in (0, 1)]
        leader, follower = (n.wait_ready(READY_S) for n in nodes)
        assert complete(leader.url, PROMPTS[1]) == v3_texts[PROMPTS[1]]
    finally:
        for node in nodes:
            node.kill()
            node.stop()


def _the_group_shows_on_both_hosts(leader: ServeProcess, follower: ServeProcess) -> None:
    with urllib.request.urlopen(leader.url + "/cluster", timeout=10) as response:
        advert = json.load(response)["node"]
    details = advert["models"][0]["details"]
    assert advert["models"][0]["tensor_parallel"] == 4
    assert [r["routed_experts"] for r in details["ranks"]] == [[0, 4], [5, 9], [10, 13], [14, 17]]
    group = advert["group"]
    assert (group["role"], group["hosts"], group["world_size"]) == ("leader", 2, 4)
    assert [(m["node"], m["ranks"], m["url"]) for m in group["members"]] == [
        ("central-0", [0, 1], leader.url), ("central-1", [2, 3], follower.url)]
    with urllib.request.urlopen(follower.url + "/ready", timeout=10) as response:
        assert json.load(response)["status"] == "ready"
    with urllib.request.urlopen(follower.url + "/cluster", timeout=10) as response:
        advert = json.load(response)["node"]
    assert advert["models"] == [] and advert["group"]["role"] == "follower"  # peers never route here
    with pytest.raises(urllib.error.HTTPError) as refused:
        post(follower.url, {"model": MODEL, "prompt": "It was", "max_tokens": 2})
    assert refused.value.code == 503
    assert f"served by central-0 ({leader.url})" in refused.value.read().decode()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["status", "--url", leader.url]) == 0
    rows = {line.split()[0]: line for line in out.getvalue().splitlines()[1:3]}
    assert "central/leader" in rows["central-0"] and "×4" in rows["central-0"]  # the model: every rank
    assert "central/host 1" in rows["central-1"] and "in group" in rows["central-1"]
    assert "(ranks 2-3)" in rows["central-1"] and "×2" in rows["central-1"]
    assert follower.url in rows["central-1"]


def _a_killed_follower_rank_ends_the_stream_and_both_daemons(leader: ServeProcess,
                                                             follower: ServeProcess) -> None:
    ranks = ranks_of(leader) + ranks_of(follower)
    victim = next(p for p in ranks_of(follower) if p.environ().get("RANK") == "3")
    body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 1500, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with post(leader.url, body) as stream:
        assert stream.readline().startswith(b"data: ")  # tokens are flowing
        victim.kill()
        rest = stream.read().decode()
    # the error names a rank: the killed one, or a leader's rank whose collective failed first (a race)
    assert '"error"' in rest and re.search(r"rank \d", rest) and rest.rstrip().endswith("data: [DONE]")
    assert leader.process.wait(timeout=60) == 1 and follower.process.wait(timeout=60) == 1
    # the leader logs why its group ended, naming a rank: the follower's report of the kill, or (a race:
    # the killed rank's peers see the connection reset first) its own rank whose collective failed
    ended = leader.log_events("group_lost", "group_ended")
    assert ended, leader.log_text()[-3000:]
    why = ended[0].get("reason") or ended[0].get("why") or ""
    assert ("was killed by SIGKILL" in why) if ended[0]["event"] == "group_lost" else re.search(r"rank \d", why), ended
    assert "engine_failed" in follower.log_text()
    assert gone(ranks)
    leader.stop(), follower.stop()


def _a_killed_follower_daemon_ends_requests_cleanly(leader: ServeProcess, follower: ServeProcess) -> None:
    """A stream that has tokens ends with an error event and [DONE]; a request that has none yet, 503."""
    ranks = ranks_of(leader) + ranks_of(follower)
    waiting: dict[str, object] = {}

    def whole_answer() -> None:
        try:
            post(leader.url, {"model": MODEL, "prompt": PROMPTS[2], "max_tokens": 1500, "temperature": 0,
                              "ignore_eos": True}).read()
        except urllib.error.HTTPError as exc:
            waiting["status"], waiting["body"] = exc.code, exc.read().decode()

    body = {"model": MODEL, "prompt": PROMPTS[1], "max_tokens": 1500, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with post(leader.url, body) as stream:
        assert stream.readline().startswith(b"data: ")
        unstreamed = threading.Thread(target=whole_answer)
        unstreamed.start()
        time.sleep(1.0)  # it is in the batch
        follower.process.send_signal(signal.SIGKILL)
        rest = stream.read().decode()
    unstreamed.join(60)
    assert '"error"' in rest and "central-1" in rest and rest.rstrip().endswith("data: [DONE]")
    assert waiting["status"] == 503 and "central-1" in str(waiting["body"])
    assert leader.process.wait(timeout=60) == 1 and follower.process.wait(timeout=60) == -signal.SIGKILL
    assert gone(ranks)  # the follower's ranks died with their daemon (PR_SET_PDEATHSIG)
    leader.stop(), follower.stop()


def test_a_follower_for_another_model_or_rank_count_is_refused_on_both_hosts(tmp_path, v3, ports):
    folder = v3[0]
    leader = start(tmp_path, 0, host_config(tmp_path, 0, ports, folder, join_timeout=30), ports, "a")
    followers = []
    try:
        for run, config in (("model", host_config(tmp_path, 1, ports, folder, model="deepseek-v3-tiny")),
                            ("ranks", host_config(tmp_path, 1, ports, folder, ranks=1))):
            follower = start(tmp_path, 1, config, ports, run)
            followers.append(follower)
            assert follower.process.wait(timeout=120) == 1
        assert leader.process.wait(timeout=120) == 1  # after its join_timeout, still short of a follower
    finally:
        for node in [leader, *followers]:
            node.kill()
            node.stop()
    model_why = ("model differs: 'deepseek-r1-tiny' on the leader central-0, "
                 "'deepseek-v3-tiny' on host 1 (central-1)")
    ranks_why = "ranks_per_host differs: 2 on the leader central-0, 1 on host 1 (central-1)"
    for follower, why in zip(followers, (model_why, ranks_why)):
        assert why in _event(follower, "model_load_failed")["error"]
        assert "rank_started" not in follower.log_text()
    refusals = [e["why"] for e in leader.log_events("rendezvous_refused")]
    assert [model_why in refusals[0], ranks_why in refusals[1]] == [True, True]
    failed = _event(leader, "model_load_failed")["error"]
    assert "hosts 1 did not join the group" in failed and ranks_why in failed
    assert "rank_started" not in leader.log_text() and "Traceback" not in leader.log_text()


def test_a_leader_that_never_answers_ends_the_follower_after_join_timeout(tmp_path, v3, ports):
    config = host_config(tmp_path, 1, ports, v3[0], join_timeout=3)
    follower = start(tmp_path, 1, config, ports, "alone")
    try:
        assert follower.process.wait(timeout=120) == 1
    finally:
        follower.kill()
        follower.stop()
    error = _event(follower, "model_load_failed")["error"]
    rendezvous = f"127.0.0.1:{ports['rendezvous']}"
    assert f"the leader's rendezvous at {rendezvous} did not answer within join_timeout = 3s" in error
    assert "Connection refused" in error
    assert follower.log_events("rendezvous_waiting") and "rank_started" not in follower.log_text()


def _event(node: ServeProcess, name: str) -> dict:
    found = node.log_events(name)
    assert found, f"no {name} in {node.name}'s log:\n{node.log_tail()}"
    return found[0]
