"""`dsnode status`: rows from a /cluster document, the table, and the command against a live node."""

from __future__ import annotations

import asyncio
import dataclasses
import json

from dsnode.cli import main
from dsnode.cluster.state import UpstreamState
from dsnode.ops.status import EXIT_UNREACHABLE, cluster_rows, format_table

from tests.daemon.api.conftest import MODEL
from tests.support.nodes import free_port

NOW = 1_700_000_000.0

ADVERT = {
    "name": "edge-1",
    "role": "edge",
    "url": "http://10.0.0.2:8000",
    "ready": True,
    "reason": "",
    "host": {"gpus": [{"index": 0, "name": "Tesla T4", "memory_total_mib": 15360}]},
    "models": [{"name": "deepseek-r1", "max_context": 4096, "ready": True}],
    "load": {"waiting": 2, "running": 5, "tokens_per_second": 41.5},
}
CENTRAL_ADVERT = {
    "name": "central-1",
    "role": "central",
    "ready": True,
    "host": {"gpus": [{"name": "NVIDIA A40"}, {"name": "NVIDIA A40"}]},
    "models": [{"name": "deepseek-r1", "max_context": 32768}],
    "load": {"waiting": 0, "running": 3, "tokens_per_second": 310.0},
}


def peers() -> list[dict]:
    return [
        dataclasses.asdict(
            UpstreamState(
                "http://10.0.0.10:8000",
                3,
                3,
                True,
                name="central-1",
                role="central",
                ready=True,
                last_seen=NOW - 4,
                advert=CENTRAL_ADVERT,
            )
        ),
        dataclasses.asdict(
            UpstreamState(
                "http://10.0.0.11:8000",
                1,
                0,
                False,
                name="central-2",
                role="central",
                ready=True,
                last_seen=NOW - 600,
                last_error="connection refused",
                fails=1,
                reachable=False,
            )
        ),
        dataclasses.asdict(UpstreamState("http://10.0.0.12:8000", 2, 2, False)),
        dataclasses.asdict(
            UpstreamState(
                "http://10.0.0.13:8000",
                1,
                0,
                False,
                name="central-3",
                ready=True,
                last_seen=NOW - 1,
                reachable=True,
                down=True,
                fails=1,
                last_error="answered HTTP 500",
            )
        ),
    ]


def test_rows_show_the_node_then_each_peer():
    rows = cluster_rows({"node": ADVERT, "peers": peers()}, now=NOW)
    assert [r.node for r in rows] == [
        "edge-1",
        "central-1",
        "central-2",
        "http://10.0.0.12:8000",
        "central-3",
    ]
    edge, central, unreachable, unpolled, down = rows
    assert edge.this_node and edge.state == "ready" and edge.gpus == ["Tesla T4"] and edge.context == 4096
    assert (edge.waiting, edge.running, edge.tokens_per_second) == (2, 5, 41.5)
    assert central.state == "ready" and central.weight == 3 and central.last_seen_s == 4
    assert central.gpus == ["NVIDIA A40", "NVIDIA A40"] and central.context == 32768 and central.running == 3
    assert unreachable.state == "unreachable" and unreachable.error == "connection refused"
    assert down.state == "down" and down.error == "answered HTTP 500" and down.effective_weight == 0
    assert unpolled.state == "not polled" and unpolled.last_seen_s is None and unpolled.models == []


def test_table_has_one_line_per_node_and_says_what_is_wrong():
    table = format_table(cluster_rows({"node": ADVERT, "peers": peers()}, now=NOW))
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["NODE", "ROLE", "STATE", "WEIGHT"]
    central = next(line for line in lines if line.startswith("central-1"))
    assert "3/3" in central and "2xA40" in central and "32768" in central and "0/3" in central
    assert "4s ago" in central and "310.0" in central
    assert "10m ago" in next(line for line in lines if line.startswith("central-2"))
    assert "never" in next(line for line in lines if line.startswith("http://10.0.0.12:8000"))
    assert lines[1].startswith("edge-1 *") and "1xT4" in lines[1] and "now" in lines[1]
    assert "  central-2: connection refused" in lines


async def test_status_against_a_live_node(server, node, capsys):
    url = str(server.make_url("")).rstrip("/")
    assert await asyncio.to_thread(main, ["status", "--url", url]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[1].startswith("node-under-test *")
    assert "central" in table[1] and "ready" in table[1] and MODEL in table[1] and "512" in table[1]

    assert await asyncio.to_thread(main, ["status", "--url", url, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [n["node"] for n in out["nodes"]] == ["node-under-test"]
    me = out["nodes"][0]
    assert (
        me["models"] == [MODEL] and me["context"] == node.engine.info.max_context and me["state"] == "ready"
    )
    assert out["cluster"]["node"]["name"] == "node-under-test"


def test_status_when_the_node_cannot_be_reached(capsys):
    url = f"http://127.0.0.1:{free_port()}"
    assert main(["status", "--url", url, "--timeout", "2"]) == EXIT_UNREACHABLE
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"cannot reach {url}" in captured.err and "Is dsnode running there?" in captured.err
