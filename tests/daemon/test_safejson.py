"""JSON from untrusted bytes: what `json.loads` lets through and the rest of a node cannot hold."""

from __future__ import annotations

import pytest
from dsnode.safejson import JSONRefused, depth_of, loads, lone_surrogate_path


def refused(raw: bytes, depth: int = 64) -> JSONRefused:
    with pytest.raises(JSONRefused) as info:
        loads(raw, depth)
    return info.value


def test_ordinary_json_parses_as_json_loads_does():
    raw = b'{"model": "m", "messages": [{"role": "user", "content": "caf\\u00e9 \\ud83d\\ude00"}], "n": 1}'
    assert loads(raw, 64) == {"model": "m", "messages": [{"role": "user", "content": "café 😀"}], "n": 1}


@pytest.mark.parametrize("opening, closing", [(b"[", b"]"), (b'{"a":', b"}")])
def test_nesting_deeper_than_the_bound_is_refused_however_deep(opening, closing):
    assert refused(opening * 100_000 + b"1" + closing * 100_000).code == "json_too_deep"  # RecursionError
    assert refused(opening * 65 + b"1" + closing * 65).code == "json_too_deep"  # within Python's limit
    assert depth_of(loads(opening * 64 + b"1" + closing * 64, 64)) == 64


def test_brackets_inside_strings_are_not_nesting():
    assert loads(b'{"prompt": "' + b"[{" * 500 + b'"}', 8) == {"prompt": "[{" * 500}


def test_a_lone_surrogate_is_refused_with_where_it_is():
    error = refused(b'{"messages": [{"role": "user", "content": "hi \\ud800"}]}')
    assert (error.code, error.path) == ("invalid_unicode", "messages[0].content")
    assert refused(b'{"prompt": "\\uDFFF"}').path == "prompt"
    assert refused(b'{"x": {"\\udc00": 1}}').path == "x"  # in a key
    assert refused(b'"\\ud83d\\ud83d"').path == ""  # two high halves are no pair
    assert lone_surrogate_path({"a": ["ok", "\udc80"]}) == "a[1]"


def test_an_escaped_backslash_before_u_d800_is_plain_text():
    assert loads(b'{"prompt": "\\\\ud800"}', 64) == {"prompt": "\\ud800"}


@pytest.mark.parametrize("raw", [b"{not json", b'{"a": "\xff"}', b"", b"1" * 5000, b'{"n": ' + b"9" * 4301 + b"}"])
def test_what_is_not_json_is_refused_never_raised_otherwise(raw):
    assert refused(raw).code == "invalid_json"
