"""journald's native protocol: the bytes on the wire, and structlog events arriving as fields.

A datagram socket bound in a temporary folder plays journald; `parse_entry` is an independent
reader of the format (systemd.io/JOURNAL_NATIVE_PROTOCOL) to check the encoder against."""

from __future__ import annotations

import array
import fcntl
import io
import json
import logging
import os
import socket
import struct
import types

import pytest
import structlog
from dsnode.journal import JournalSender, encode_entry, field_name, stream_is_journal
from dsnode.logs import configure_logging, resolve_format
from dsnode.node import Node
from dsnode.record import RequestRecord


def parse_entry(data: bytes) -> dict[str, str]:
    fields: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        newline = data.index(b"\n", pos)
        line = data[pos:newline]
        if b"=" in line:
            key, value = line.split(b"=", 1)
            pos = newline + 1
        else:  # binary-safe: KEY\n<le64 size><data>\n
            key = line
            (size,) = struct.unpack("<Q", data[newline + 1 : newline + 9])
            value = data[newline + 9 : newline + 9 + size]
            assert data[newline + 9 + size : newline + 10 + size] == b"\n"
            pos = newline + 10 + size
        assert key.decode() not in fields, f"field {key!r} twice"
        fields[key.decode()] = value.decode()
    return fields


@pytest.fixture
def journald(tmp_path):
    """A stand-in for /run/systemd/journal/socket: returns (path, receive-one-entry)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "journal.socket")
    sock.bind(path)
    sock.settimeout(10)

    def receive() -> dict[str, str]:
        data, ancillary, _, _ = sock.recvmsg(1 << 20, socket.CMSG_SPACE(4))
        receive.via_memfd = bool(ancillary)  # type: ignore[attr-defined]
        if ancillary:  # an oversized entry: a sealed memfd instead of the data
            level, kind, raw = ancillary[0]
            assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS) and data == b""
            fd = array.array("i", raw)[0]
            try:
                seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
                assert seals & fcntl.F_SEAL_WRITE and seals & fcntl.F_SEAL_SHRINK
                data = os.pread(fd, os.fstat(fd).st_size, 0)
            finally:
                os.close(fd)
        return parse_entry(data)

    def pending() -> int:
        sock.setblocking(False)
        try:
            sock.recv(1 << 20)
            return 1
        except BlockingIOError:
            return 0
        finally:
            sock.settimeout(10)

    receive.pending = pending  # type: ignore[attr-defined]
    yield path, receive
    sock.close()


# --- encoding -------------------------------------------------------------------------------------
def test_simple_and_binary_safe_fields():
    entry = encode_entry({"MESSAGE": "hello", "DSNODE_TRACE": "line 1\nline 2", "PRIORITY": "6"})
    assert entry == (
        b"MESSAGE=hello\n"
        b"DSNODE_TRACE\n" + struct.pack("<Q", 13) + b"line 1\nline 2\n"
        b"PRIORITY=6\n"
    )
    assert parse_entry(entry) == {"MESSAGE": "hello", "DSNODE_TRACE": "line 1\nline 2", "PRIORITY": "6"}


def test_values_are_utf8_and_may_hold_equals_signs():
    entry = encode_entry({"MESSAGE": "a=b ünïcode"})
    assert entry == "MESSAGE=a=b ünïcode\n".encode()
    assert parse_entry(entry)["MESSAGE"] == "a=b ünïcode"


def test_field_names_are_what_journald_accepts():
    assert field_name("request_id") == "DSNODE_REQUEST_ID"
    assert field_name("x-dsnode.route") == "DSNODE_X_DSNODE_ROUTE"
    assert field_name("ttft_ms") == "DSNODE_TTFT_MS"
    long = field_name("k" * 100)
    assert len(long) == 64 and long.startswith("DSNODE_KKK")


# --- sending --------------------------------------------------------------------------------------
def test_sender_delivers_one_datagram_per_entry(journald):
    path, receive = journald
    sender = JournalSender(path)
    assert sender.send({"MESSAGE": "one", "DSNODE_N": "1"})
    assert sender.send({"MESSAGE": "two\nlines"})
    assert receive() == {"MESSAGE": "one", "DSNODE_N": "1"}
    assert receive() == {"MESSAGE": "two\nlines"}
    assert not receive.via_memfd  # type: ignore[attr-defined]
    sender.close()


def test_an_entry_too_big_for_a_datagram_goes_in_a_sealed_memfd(journald):
    path, receive = journald
    sender = JournalSender(path)
    big = "x" * 1_000 + "\n" + "y" * (4 << 20)  # 4 MiB: over any datagram limit
    assert sender.send({"MESSAGE": "big", "DSNODE_BLOB": big})
    assert receive() == {"MESSAGE": "big", "DSNODE_BLOB": big}
    assert receive.via_memfd  # type: ignore[attr-defined]
    sender.close()


def test_no_journald_is_reported_not_raised(tmp_path):
    sender = JournalSender(str(tmp_path / "absent.socket"))
    assert sender.send({"MESSAGE": "lost"}) is False
    sender.close()


# --- structlog events as journal entries ----------------------------------------------------------
def test_every_event_field_becomes_a_dsnode_field(journald, restore_logging):
    path, receive = journald
    out = io.StringIO()
    assert configure_logging("info", "journal", stream=out, journal_socket=path) == "journal"
    log = structlog.get_logger("dsnode.test")
    log.info("request", request_id="r-1", route="forwarded", completion_tokens=12, ttft_ms=3.5,
             stream=True, upstream=None, problems=["a", "b"])
    entry = receive()
    assert entry["PRIORITY"] == "6" and entry["SYSLOG_IDENTIFIER"] == "dsnode"
    assert entry["DSNODE_EVENT"] == "request"
    assert entry["DSNODE_REQUEST_ID"] == "r-1" and entry["DSNODE_ROUTE"] == "forwarded"
    assert entry["DSNODE_COMPLETION_TOKENS"] == "12" and entry["DSNODE_TTFT_MS"] == "3.5"
    assert entry["DSNODE_STREAM"] == "true" and entry["DSNODE_PROBLEMS"] == '["a","b"]'
    assert "DSNODE_UPSTREAM" not in entry  # None: no field at all
    assert entry["MESSAGE"].startswith("request request_id=r-1 route=forwarded completion_tokens=12")
    assert out.getvalue() == ""  # nothing duplicated on stdout


@pytest.mark.parametrize("method,priority", [("warning", "4"), ("error", "3"), ("critical", "2")])
def test_levels_become_syslog_priorities(journald, restore_logging, method, priority):
    path, receive = journald
    configure_logging("info", "journal", stream=io.StringIO(), journal_socket=path)
    getattr(structlog.get_logger(), method)("config_reload_failed", file="/etc/dsnode/dsnode.toml")
    entry = receive()
    assert entry["PRIORITY"] == priority and entry["DSNODE_FILE"] == "/etc/dsnode/dsnode.toml"


def test_level_filter_applies_before_sending(journald, restore_logging):
    path, receive = journald
    configure_logging("warning", "journal", stream=io.StringIO(), journal_socket=path)
    log = structlog.get_logger()
    log.info("routine")
    log.warning("unusual")
    assert receive()["DSNODE_EVENT"] == "unusual"
    assert receive.pending() == 0  # type: ignore[attr-defined]


def test_a_traceback_is_one_multiline_field_and_follows_the_message(journald, restore_logging):
    path, receive = journald
    configure_logging("info", "journal", stream=io.StringIO(), journal_socket=path)
    try:
        raise ValueError("bad weights")
    except ValueError:
        structlog.get_logger().exception("model_load_failed", model="m")
    entry = receive()
    assert entry["PRIORITY"] == "3"
    assert entry["DSNODE_EXCEPTION"].startswith("Traceback") and "ValueError: bad weights" in entry["DSNODE_EXCEPTION"]
    assert entry["MESSAGE"].startswith("model_load_failed model=m\nTraceback")


def test_the_request_record_reaches_the_journal_with_all_its_fields(journald, restore_logging):
    """What `journalctl -u dsnode DSNODE_ROUTE=…` filters on: Node.observe's one record per request."""
    path, receive = journald
    configure_logging("info", "journal", stream=io.StringIO(), journal_socket=path)
    record = RequestRecord("req-42", "chat", "edge-1", route="forwarded", model="deepseek-r1",
                           upstream="http://10.0.0.5:8000", prompt_tokens=3000, completion_tokens=20)
    record.done(200)
    Node.observe(types.SimpleNamespace(observers=[]), record)  # type: ignore[arg-type]
    entry = receive()
    expected = {field_name(k): v for k, v in record.fields().items() if v is not None}
    for name, value in expected.items():
        assert entry[name] == (json.dumps(value) if isinstance(value, bool) else str(value)), name
    assert entry["DSNODE_ROUTE"] == "forwarded" and entry["DSNODE_NODE"] == "edge-1"
    assert entry["DSNODE_UPSTREAM"] == "http://10.0.0.5:8000"


def test_entries_fall_back_to_json_lines_when_journald_is_gone(tmp_path, restore_logging):
    out = io.StringIO()
    configure_logging("info", "journal", stream=out, journal_socket=str(tmp_path / "absent.socket"))
    structlog.get_logger().info("ready", model="m")
    line = json.loads(out.getvalue())
    assert line["event"] == "ready" and line["model"] == "m" and line["level"] == "info"


def test_stdlib_records_of_libraries_go_to_the_journal_too(journald, restore_logging):
    path, receive = journald
    configure_logging("info", "journal", stream=io.StringIO(), journal_socket=path)
    logging.getLogger("aiohttp.server").warning("Error handling request from %s", "10.0.0.9")
    entry = receive()
    assert entry["MESSAGE"] == "Error handling request from 10.0.0.9"
    assert entry["PRIORITY"] == "4" and entry["DSNODE_LOGGER"] == "aiohttp.server"
    assert entry["CODE_FUNC"] == "test_stdlib_records_of_libraries_go_to_the_journal_too"


# --- format = "auto" ------------------------------------------------------------------------------
def test_auto_picks_the_journal_only_when_stdout_is_the_journal_stream(tmp_path):
    with open(tmp_path / "out", "w") as stream:
        st = os.fstat(stream.fileno())
        assert stream_is_journal(f"{st.st_dev}:{st.st_ino}", stream)
        assert resolve_format("auto", stream, f"{st.st_dev}:{st.st_ino}") == "journal"
        # inherited from a parent whose stdout was the journal, but ours is a file: JSON lines
        assert resolve_format("auto", stream, f"{st.st_dev}:{st.st_ino + 1}") == "json"
        assert resolve_format("auto", stream, None) == "json"
        assert resolve_format("auto", stream, "garbage") == "json"
        assert resolve_format("journal", stream, None) == "journal"
        assert resolve_format("json", stream, f"{st.st_dev}:{st.st_ino}") == "json"
    assert not stream_is_journal("1:2", io.StringIO())  # no file descriptor at all


def test_json_lines_are_unchanged_by_all_this(restore_logging):
    out = io.StringIO()
    assert configure_logging("info", "json", stream=out) == "json"
    structlog.get_logger().info("listening", url="http://127.0.0.1:8000")
    line = json.loads(out.getvalue())
    assert line["event"] == "listening" and "timestamp" in line


def test_message_values_are_quoted_exactly_when_they_hold_white_space_or_a_quote():
    from dsnode.journal import render_message

    for code in range(0x3100):
        char = chr(code)
        if 0xD800 <= code <= 0xDFFF:
            continue
        message = render_message({"event": "e", "k": f"a{char}b"})
        quoted = message != f"e k=a{char}b"
        assert quoted == (char.isspace() or char == '"'), hex(code)
    assert render_message({"event": "e", "k": ""}) == 'e k=""'
