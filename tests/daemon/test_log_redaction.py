"""Credentials never reach the log through another library: what aiohttp and asyncio log is redacted
(header values of Authorization, X-DSNode-Peer and cookies, bearer tokens), and an HTTP parser error —
which quotes the request, a continuation line without its header name included — is summarised."""

from __future__ import annotations

import io
import logging

import pytest
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.web_protocol import RequestPayloadError
from dsnode.logs import configure_logging, describe_http_error, exception_text, redact

from tests.daemon.test_journal import journald  # noqa: F401 (a fixture)

KEY = "sk-live-0d5c2a7e91f34b66a8c1"


@pytest.mark.parametrize("text, expected", [
    (f"b'Authorization: Bearer {KEY}\\x01'", "b'Authorization: <redacted>\\x01'"),
    (f"proxy-authorization=Basic {KEY}", "proxy-authorization=<redacted>"),
    (f"X-DSNode-Peer: v2 1 n {KEY} boot central-1 edge-1\r\nHost: x", "X-DSNode-Peer: <redacted>\r\nHost: x"),
    (f"Cookie: session={KEY}; theme=dark", "Cookie: <redacted>"),
    (f"Set-Cookie: s={KEY}", "Set-Cookie: <redacted>"),
    (f"reading: b'Bearer {KEY}...'", "reading: b'Bearer <redacted>'"),
    ("Host: example and nothing secret", "Host: example and nothing secret"),
])
def test_credential_values_are_redacted(text, expected):
    assert redact(text) == expected


def test_an_http_parser_error_is_summarised_without_what_it_quotes():
    continuation = BadHttpMessage(f"Unexpected whitespace after header value:\n\n  b' {KEY}'\n  ^")
    assert describe_http_error(continuation) == "Unexpected whitespace after header value"
    too_long = LineTooLong(f"{KEY}xxxx...".encode(), 8190)
    assert describe_http_error(too_long) == "a request line or header is longer than 8190 bytes"
    try:
        try:
            raise continuation
        except BadHttpMessage as exc:
            raise RequestPayloadError(str(exc)) from exc
    except RequestPayloadError as wrapped:
        text = exception_text(wrapped)
    assert text == "RequestPayloadError: Unexpected whitespace after header value" and KEY not in text


def test_in_the_journal_a_library_record_is_redacted_too(journald, restore_logging):  # noqa: F811
    path, receive = journald
    configure_logging("info", "journal", stream=io.StringIO(), journal_socket=path)
    try:
        raise BadHttpMessage(f"Invalid header value char:\n\n  b'Bearer {KEY}\\x01'\n  ^")
    except BadHttpMessage:
        logging.getLogger("aiohttp.server").exception("Error handling request from %s: Cookie: %s", "10.0.0.9", KEY)
    entry = receive()
    assert KEY not in str(entry)
    assert entry["MESSAGE"] == ("Error handling request from 10.0.0.9: Cookie: <redacted>\n"
                                "BadHttpMessage: Invalid header value char")
    assert entry["PRIORITY"] == "3" and entry["DSNODE_LOGGER"] == "aiohttp.server"
