"""dsnode as a real systemd service: systemd 252 as PID 1 of a throw-away container, installed from the
wheel with `dsnode install-service` into the venv /opt/dsnode, the bundled dense model pulled into
the model store (/var/lib/dsnode/models) with `dsnode models pull`.

The tests share one service and run in file order: installed → start → status → reload → journal →
SIGKILL → watchdog → stop → uninstall. Each one leaves the service active for the next, except the
last two."""

from __future__ import annotations

import json
import select
import shlex
import uuid

import pytest

from tests.systemd.conftest import UNIT, WAIT_S, Host

pytestmark = [pytest.mark.slow, pytest.mark.systemd]

SERVING = "serving 1 model (tiny-dense, transformers on cpu) at http://127.0.0.1:8000"


def chat(max_tokens: int, **extra: object) -> dict[str, object]:
    return {"model": "tiny-dense", "messages": [{"role": "user", "content": "Call me"}],
            "max_tokens": max_tokens, "temperature": 0, **extra}


def serving_pid(host: Host) -> str:
    """The main PID of the active, serving unit; never "0" (`kill 0` would signal a whole group)."""
    show = host.wait_for("an active, serving unit", lambda: restarted(host, old_pid="0"))
    pid = show["MainPID"]
    assert pid.isdigit() and int(pid) > 1, show
    return pid


def restarted(host: Host, old_pid: str) -> dict[str, str] | None:
    """The unit's state once a new main process has said READY=1, else None."""
    show = host.show("MainPID", "ActiveState", "SubState", "NRestarts", "StatusText")
    if show["MainPID"] not in ("0", old_pid) and show["ActiveState"] == "active" and show["StatusText"] == SERVING:
        return show
    return None


def test_the_one_step_install_left_it_enabled_and_serving(systemd_host: Host):
    assert systemd_host.sh(f"systemctl is-enabled {UNIT}").check().stdout.strip() == "enabled"
    show = systemd_host.show("ActiveState", "FragmentPath", "ExecStart")
    assert show["ActiveState"] == "active" and show["FragmentPath"] == "/etc/systemd/system/dsnode.service"
    assert "path=/opt/dsnode/bin/dsnode" in show["ExecStart"]
    listed = systemd_host.sh("/opt/dsnode/bin/dsnode models list").check().stdout.splitlines()
    assert listed[1].split()[0] == "tiny-dense" and listed[1].endswith("/etc/dsnode/dsnode.toml")
    again = systemd_host.sh("/opt/dsnode/bin/dsnode install-service --role central").check().stdout
    assert "dsnode.service: unchanged" in again and "dsnode.toml: kept (yours)" in again  # idempotent
    assert systemd_host.show("NRestarts")["NRestarts"] == "0"


def test_start_returns_once_the_port_answers(systemd_host: Host):
    # install-service ran `systemctl start` (Type=notify: it blocks until READY=1) and returned just now
    systemd_host.sh(f"systemctl start {UNIT}").check()
    ready = systemd_host.client("get", "/ready")  # at once, no retry
    assert ready["status"] == 200 and ready["body"]["model"] == "tiny-dense"
    show = systemd_host.show("ActiveState", "SubState", "StatusText", "WatchdogUSec", "Type", "NRestarts")
    assert show == {"ActiveState": "active", "SubState": "running", "StatusText": SERVING,
                    "WatchdogUSec": "6s", "Type": "notify", "NRestarts": "0"}


def test_systemctl_status_shows_what_the_node_does(systemd_host: Host):
    status = systemd_host.sh(f"systemctl status {UNIT} --no-pager").check().stdout
    assert f'Status: "{SERVING}"' in status
    assert "Active: active (running)" in status


def test_the_running_unit_is_sandboxed(systemd_host: Host):
    """What `systemd-analyze security` sees on the live unit, and what the process runs as."""
    pid = serving_pid(systemd_host)
    owner = systemd_host.sh(f"stat -c %U /proc/{pid}").check().stdout.strip()
    assert owner == "dsnode"
    caps = systemd_host.sh(f"grep -E '^Cap(Eff|Prm|Bnd):' /proc/{pid}/status").check().stdout
    assert all(line.split()[1] == "0000000000000000" for line in caps.splitlines()), caps
    security = systemd_host.sh(f"systemd-analyze security --no-pager {UNIT}").check().stdout
    exposure = float(security.split("Overall exposure level for dsnode.service:")[1].split()[0])
    assert exposure <= 2.5, security


def test_reload_applies_an_edited_config_without_a_restart(systemd_host: Host):
    host = systemd_host
    before = host.show("MainPID", "NRestarts")
    assert host.client("post", "/v1/chat/completions", chat(8))["status"] == 200
    cluster = host.client("get", "/cluster")["body"]
    assert [(p["url"], p["weight"]) for p in cluster["peers"]] == [("http://127.0.0.2:9", 1)]

    host.sh("cp -p /etc/dsnode/dsnode.toml /etc/dsnode/dsnode.toml.orig && "
            "sed -i 's/^weight = 1$/weight = 3/' /etc/dsnode/dsnode.toml && "
            "printf '\\n[limits]\\nmax_tokens = 4\\n' >> /etc/dsnode/dsnode.toml && "
            f"systemctl reload {UNIT}").check()
    # systemd 252 returns from `reload` once SIGHUP is sent; the daemon then says RELOADING=1 … READY=1
    host.wait_for("the reloaded [limits]", lambda: host.client("post", "/v1/chat/completions", chat(8))["status"] == 400)
    refused = host.client("post", "/v1/chat/completions", chat(8))["body"]["error"]
    assert refused["code"] == "max_tokens_too_large"
    peers = host.client("get", "/cluster")["body"]["peers"]
    assert [(p["url"], p["weight"]) for p in peers] == [("http://127.0.0.2:9", 3)]
    host.wait_for("active again", lambda: host.show("ActiveState")["ActiveState"] == "active")
    assert host.show("MainPID", "NRestarts") == before  # the same process: reloaded, not restarted
    assert host.show("StatusText")["StatusText"] == SERVING
    assert host.journal("DSNODE_EVENT=config_reloaded")

    # an invalid file is refused, and the settings in force stay
    host.sh("printf '\\n[batching]\\nmax_queue = -1\\n' >> /etc/dsnode/dsnode.toml && "
            f"systemctl reload {UNIT}").check()
    failed = host.wait_for("the refused reload", lambda: host.journal("DSNODE_EVENT=config_reload_failed"))
    assert failed[0]["PRIORITY"] == "3" and "max_queue" in failed[0]["DSNODE_PROBLEMS"]
    host.wait_for("READY=1 after the refused reload",
                  lambda: host.show("StatusText")["StatusText"].startswith(SERVING + "; the last reload was refused"))
    assert host.client("post", "/v1/chat/completions", chat(8))["status"] == 400

    host.sh(f"mv /etc/dsnode/dsnode.toml.orig /etc/dsnode/dsnode.toml && systemctl reload {UNIT}").check()
    host.wait_for("the original config", lambda: host.client("post", "/v1/chat/completions", chat(8))["status"] == 200)
    host.wait_for("serving status", lambda: host.show("StatusText")["StatusText"] == SERVING)
    assert host.show("MainPID", "NRestarts") == before


def test_each_request_is_one_journal_entry_with_fields(systemd_host: Host):
    host = systemd_host
    request_id = f"sdtest-{uuid.uuid4().hex[:12]}"
    answer = host.client("post", "/v1/chat/completions", chat(4), (f"X-Request-Id:{request_id}",))
    assert answer["status"] == 200 and answer["headers"]["x-request-id"] == request_id

    entries = host.wait_for("the request's journal entry", lambda: host.journal(f"DSNODE_REQUEST_ID={request_id}"))
    assert len(entries) == 1
    entry = entries[0]
    assert entry["_SYSTEMD_UNIT"] == UNIT and entry["_TRANSPORT"] == "journal"
    assert entry["SYSLOG_IDENTIFIER"] == "dsnode" and entry["PRIORITY"] == "6"
    assert entry["DSNODE_EVENT"] == "request" and entry["DSNODE_ROUTE"] == "local"
    assert entry["DSNODE_NODE"] == "sdtest" and entry["DSNODE_MODEL"] == "tiny-dense"
    assert entry["DSNODE_STATUS"] == "200" and entry["DSNODE_COMPLETION_TOKENS"] == "4"
    assert int(entry["DSNODE_PROMPT_TOKENS"]) > 0
    assert float(entry["DSNODE_DURATION_MS"]) > 0 and float(entry["DSNODE_TTFT_MS"]) > 0
    assert entry["MESSAGE"].startswith(f"request request_id={request_id} ")

    # filtering on fields, as docs/systemd.md shows an operator
    lines = host.sh(f"journalctl -u {UNIT} -o cat --no-pager DSNODE_ROUTE=local DSNODE_REQUEST_ID={request_id}").check()
    assert lines.stdout.count("\n") == 1

    # a client error is a warning, found with -p warning
    bad_id = f"sdtest-bad-{uuid.uuid4().hex[:8]}"
    assert host.client("post", "/v1/chat/completions", {**chat(4), "model": "nope"}, (f"X-Request-Id:{bad_id}",))["status"] == 404
    bad = host.wait_for("the 404's entry", lambda: host.journal(f"DSNODE_REQUEST_ID={bad_id}"))
    assert bad[0]["PRIORITY"] == "4" and bad[0]["DSNODE_STATUS"] == "404"
    warnings = host.sh(f"journalctl -u {UNIT} -p warning -o cat --no-pager DSNODE_EVENT=request").check().stdout
    assert bad_id in warnings and request_id not in warnings


def test_a_killed_process_is_restarted(systemd_host: Host):
    host = systemd_host
    pid = serving_pid(host)
    before = host.show("MainPID", "NRestarts")
    assert before["MainPID"] == pid
    host.sh(f"kill -KILL {pid}").check()
    after = host.wait_for("a restarted main process", lambda: restarted(host, before["MainPID"]))
    assert int(after["NRestarts"]) == int(before["NRestarts"]) + 1
    assert host.client("get", "/ready")["status"] == 200


def test_a_stuck_process_is_restarted_by_the_watchdog(systemd_host: Host):
    """SIGSTOP: the event loop (like everything else) stops, so WATCHDOG=1 stops, and after
    WatchdogSec systemd kills (SIGABRT) and restarts it. tests/daemon/test_systemd_notify.py shows
    the pings stop when only the loop is blocked."""
    host = systemd_host
    pid = serving_pid(host)
    before = host.show("MainPID", "NRestarts")
    assert before["MainPID"] == pid
    host.sh(f"kill -STOP {pid}").check()
    after = host.wait_for("the watchdog's restart", lambda: restarted(host, before["MainPID"]))
    assert int(after["NRestarts"]) == int(before["NRestarts"]) + 1
    systemd_says = host.sh(f"journalctl -u {UNIT} -o cat --no-pager _PID=1").check().stdout
    assert "dsnode.service: Watchdog timeout" in systemd_says
    assert "dsnode.service: Failed with result 'watchdog'." in systemd_says
    # SIGABRT: faulthandler leaves the stuck process's Python stacks in the journal (its stderr)
    stacks = host.sh(f"journalctl -u {UNIT} -o cat --no-pager _PID={before['MainPID']}").check().stdout
    assert "Fatal Python error: Aborted" in stacks and "File " in stacks, stacks[-2000:]
    assert host.client("get", "/ready")["status"] == 200


def test_stop_lets_an_in_flight_request_finish(systemd_host: Host):
    host = systemd_host
    ask = chat(400, stream=True, ignore_eos=True)  # ≈ seconds of generation on the tiny model
    client = host.container.popen(shlex.join(["/usr/bin/python3", "/opt/dsnode-test/payload/client.py", "stream",
                                              "/v1/chat/completions", json.dumps(ask)]))
    try:
        assert client.stdout is not None
        ready, _, _ = select.select([client.stdout], [], [], WAIT_S)
        assert ready and client.stdout.readline() == "first event\n", client.stderr.read() if client.stderr else ""
        host.sh(f"systemctl stop {UNIT}").check()  # returns when the process has exited
        out, err = client.communicate(timeout=WAIT_S)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    result = json.loads(out.strip().splitlines()[-1])
    assert result["status"] == 200, (result, err)
    events = result["events"]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert not any("error" in c for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"

    draining = host.journal("DSNODE_EVENT=draining")
    assert len(draining) == 1 and int(draining[0]["DSNODE_IN_FLIGHT"]) >= 1  # it really was in flight
    assert host.journal("DSNODE_EVENT=stopped")
    assert not host.journal("DSNODE_EVENT=drain_timeout")
    assert [e["DSNODE_CODE"] for e in host.journal("DSNODE_EVENT=exit")] == ["0"]  # one clean exit so far
    assert host.show("ActiveState", "Result") == {"ActiveState": "inactive", "Result": "success"}


def test_uninstall_removes_the_service_and_keeps_models_and_config(systemd_host: Host):
    host = systemd_host
    out = host.sh("/opt/dsnode/bin/dsnode install-service --uninstall").check().stdout
    assert "kept /etc/dsnode and the models in /var/lib/dsnode/models" in out
    assert host.show("LoadState")["LoadState"] == "not-found"
    assert host.sh("test -f /etc/dsnode/dsnode.toml && test -f /var/lib/dsnode/models/tiny-dense/current/config.json"
                   ).returncode == 0
