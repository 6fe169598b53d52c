"""journald's native protocol: each log event becomes one journal entry with its fields.

An entry is one datagram to `/run/systemd/journal/socket`: `KEY=value\\n` per field, or, for a value
holding a newline, the binary-safe form `KEY\\n<64-bit little-endian length><value>\\n`. An entry too
big for a datagram goes in a sealed memfd whose descriptor is passed instead (as sd_journal_sendv
does). See systemd's `native protocol` documentation (systemd.io/JOURNAL_NATIVE_PROTOCOL).

Every field of a structlog event `ev` becomes `DSNODE_<EV>` (`request_id` → `DSNODE_REQUEST_ID`),
next to `MESSAGE` (a readable line), `PRIORITY` (syslog level) and `SYSLOG_IDENTIFIER`, so that
`journalctl -u dsnode DSNODE_ROUTE=forwarded` works.

Every request logs one event, so building an entry is kept cheap (docs/performance.md): field names
are computed once per key, each value is turned into text once for both its field and MESSAGE, and
the entry is encoded in one pass.
"""

from __future__ import annotations

import array
import errno
import fcntl
import json
import logging
import os
import re
import socket
import struct
import sys
from typing import Any, Mapping, MutableMapping, TextIO

JOURNAL_SOCKET = "/run/systemd/journal/socket"
IDENTIFIER = "dsnode"
PREFIX = "DSNODE_"
MAX_FIELD_NAME = 64  # journald's limit

# syslog(3) levels, as journald's PRIORITY field wants them
PRIORITIES = {
    "critical": 2,
    "exception": 3,
    "error": 3,
    "warning": 4,
    "warn": 4,
    "notice": 5,
    "info": 6,
    "debug": 7,
}
# Fields the journal records by itself (timestamp), or that MESSAGE/PRIORITY already carry.
NOT_FIELDS = frozenset({"timestamp"})

_INVALID_NAME_CHARS = re.compile(r"[^A-Z0-9_]")
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL


def stream_is_journal(journal_stream: str | None, stream: TextIO) -> bool:
    """systemd sets `$JOURNAL_STREAM=DEV:INODE` for a stdout connected to journald; it only counts
    when it is still our stdout (not inherited by a child whose output went elsewhere)."""
    if not journal_stream:
        return False
    try:
        dev, inode = (int(part) for part in journal_stream.split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, inode)


def field_name(key: str, prefix: str = PREFIX) -> str:
    """`request_id` → `DSNODE_REQUEST_ID`: upper case, letters/digits/underscore, ≤ 64 chars."""
    if prefix == PREFIX:
        name = _FIELD_NAMES.get(key)
        if name is None:
            name = _field_name(key, prefix)
            if len(_FIELD_NAMES) < MAX_CACHED_NAMES:
                _FIELD_NAMES[key] = name
        return name
    return _field_name(key, prefix)


def _field_name(key: str, prefix: str) -> str:
    name = prefix + _INVALID_NAME_CHARS.sub("_", key.upper())
    return name[:MAX_FIELD_NAME]


MAX_CACHED_NAMES = 1024  # event keys come from the code: a few dozen; the cap only guards memory
_FIELD_NAMES: dict[str, str] = {}


def field_value(value: Any) -> str | None:
    """None → no field; bools as true/false (like the JSON lines); containers as JSON."""
    if type(value) is str:  # the usual case first
        return value
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, float)):
        return str(value)
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, default=str, separators=(",", ":"))
    return str(value)


def encode_entry(fields: Mapping[str, str | bytes]) -> bytes:
    """One native-protocol entry. Values with a newline use the binary-safe length-prefixed form."""
    out: list[bytes] = []
    lines: list[str] = []  # KEY=value lines (the usual case), encoded together
    for name, value in fields.items():
        if isinstance(value, str) and "\n" not in value:
            lines.append(f"{name}={value}\n")
            continue
        if lines:
            out.append("".join(lines).encode("utf-8", "replace"))
            lines = []
        data = value.encode("utf-8", "replace") if isinstance(value, str) else value
        key = name.encode("ascii")
        if b"\n" in data:
            out.append(key + b"\n" + struct.pack("<Q", len(data)) + data + b"\n")
        else:
            out.append(key + b"=" + data + b"\n")
    if lines:
        out.append("".join(lines).encode("utf-8", "replace"))
    return b"".join(out)


class JournalSender:
    """Sends entries to journald. `send` returns False when there is no journald to take them."""

    def __init__(self, path: str = JOURNAL_SOCKET) -> None:
        self.path = path
        self._sock: socket.socket | None = None

    def send(self, fields: Mapping[str, str | bytes]) -> bool:
        payload = encode_entry(fields)
        try:
            sock = self._socket()
            try:
                sock.sendto(payload, self.path)
            except OSError as exc:
                if exc.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                    raise
                self._send_memfd(sock, payload)
        except OSError:
            return False
        return True

    def _socket(self) -> socket.socket:
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        return self._sock

    def _send_memfd(self, sock: socket.socket, payload: bytes) -> None:
        """Too big for one datagram: write it to a sealed memfd and pass the descriptor."""
        fd = os.memfd_create("journal-entry", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view):]
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)  # journald refuses an unsealed memfd
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
            sock.sendmsg([], rights, 0, self.path)
        finally:
            os.close(fd)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


# --- structlog ------------------------------------------------------------------------------------
def render_message(event_dict: Mapping[str, Any]) -> str:
    """MESSAGE: what `journalctl -u dsnode` shows on one line: the event, then key=value pairs;
    a traceback follows on its own lines. Built by `journal_fields`, with the fields."""
    return journal_fields(event_dict)["MESSAGE"]


def journal_fields(event_dict: Mapping[str, Any], identifier: str = IDENTIFIER) -> dict[str, str]:
    level = str(event_dict.get("level", "info"))
    fields = {
        "MESSAGE": "",  # filled in below; first, as ever
        "PRIORITY": str(PRIORITIES.get(level, 6)),
        "SYSLOG_IDENTIFIER": identifier,
    }
    parts = [str(event_dict.get("event", ""))]
    names, needs_quotes = _FIELD_NAMES, _NEEDS_QUOTES.search
    for key, value in event_dict.items():  # each value becomes text once, for its field and MESSAGE
        text = value if type(value) is str else field_value(value)
        if text is None or key in NOT_FIELDS:
            continue
        fields[names.get(key) or field_name(key)] = text
        if key not in _NOT_IN_MESSAGE:  # quoted when empty or holding white space or a quote
            parts.append(f"{key}={json.dumps(text) if not text or needs_quotes(text) else text}")
    fields["MESSAGE"] = _with_traceback(" ".join(parts), event_dict)
    return fields


_NOT_IN_MESSAGE = frozenset({"event", "level", "exception", *NOT_FIELDS})
_NEEDS_QUOTES = re.compile(r'[\s"]')  # \s: the characters str.isspace() is true for


def _with_traceback(message: str, event_dict: Mapping[str, Any]) -> str:
    if event_dict.get("exception"):
        message += "\n" + str(event_dict["exception"]).rstrip("\n")
    return message


class JournalRenderer:
    """Last structlog processor: the event dict → journal fields (passed to `JournalLogger.msg`)."""

    def __init__(self, identifier: str = IDENTIFIER) -> None:
        self.identifier = identifier

    def __call__(self, logger: Any, method_name: str, event_dict: MutableMapping[str, Any]) -> Any:
        # the event dict is structlog's own for this one event: no copy needed for the fallback
        return (), {"fields": journal_fields(event_dict, self.identifier), "event_dict": event_dict}


class JournalLogger:
    """A structlog logger that sends to journald; when journald cannot take an entry, the event goes
    to `fallback` as a JSON line instead (stdout is the journal stream under systemd anyway)."""

    def __init__(self, sender: JournalSender, fallback: TextIO) -> None:
        self.sender = sender
        self.fallback = fallback

    def msg(self, fields: dict[str, str], event_dict: dict[str, Any]) -> None:
        if not self.sender.send(fields):
            print(json.dumps(event_dict, default=str), file=self.fallback, flush=True)

    debug = info = warning = warn = error = critical = exception = fatal = log = msg


class JournalLoggerFactory:
    def __init__(self, sender: JournalSender, fallback: TextIO) -> None:
        self._logger = JournalLogger(sender, fallback)

    def __call__(self, *args: Any) -> JournalLogger:
        return self._logger


# --- stdlib logging (third-party libraries) --------------------------------------------------------
class JournalHandler(logging.Handler):
    """Records of stdlib loggers (aiohttp, transformers…) as journal entries with their priority."""

    def __init__(self, sender: JournalSender, identifier: str = IDENTIFIER) -> None:
        super().__init__()
        self.sender = sender
        self.identifier = identifier

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.exc_info:
                message += "\n" + logging.Formatter().formatException(record.exc_info)
            fields = {
                "MESSAGE": message,
                "PRIORITY": str(PRIORITIES.get(record.levelname.lower(), 6)),
                "SYSLOG_IDENTIFIER": self.identifier,
                field_name("logger"): record.name,
                field_name("level"): record.levelname.lower(),
                "CODE_FILE": record.pathname,
                "CODE_LINE": str(record.lineno),
                "CODE_FUNC": record.funcName,
            }
            if not self.sender.send(fields):
                sys.stderr.write(f"{record.levelname} {record.name}: {message}\n")
        except Exception:
            self.handleError(record)
