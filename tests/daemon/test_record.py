"""The per-request record: its log fields, and the request ids made up for requests without one."""

from __future__ import annotations

import uuid

from dsnode.record import RequestRecord, new_request_id


def test_made_up_request_ids_are_uuid4_hex():
    ids = [new_request_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    for request_id in ids:
        parsed = uuid.UUID(hex=request_id)
        assert parsed.hex == request_id and parsed.version == 4 and parsed.variant == uuid.RFC_4122


def test_fields_in_order_with_the_optional_ones_only_when_set():
    record = RequestRecord("r-1", "chat", "edge-1", route="forwarded", model="m", prompt_tokens=3,
                           completion_tokens=2, upstream="http://10.0.0.5:8000", client="10.0.0.9")
    record.started = 100.0
    record.first_token = 100.01234
    record.finished = 100.25
    assert list(record.fields().items()) == [
        ("request_id", "r-1"), ("endpoint", "chat"), ("route", "forwarded"), ("node", "edge-1"), ("model", "m"),
        ("stream", False), ("status", 200), ("prompt_tokens", 3), ("completion_tokens", 2),
        ("finish_reason", None), ("duration_ms", 250.0), ("ttft_ms", 12.3),
        ("upstream", "http://10.0.0.5:8000"), ("client", "10.0.0.9"),
    ]
    bare = RequestRecord("r-2", "completion", "edge-1")
    bare.done(503, "no upstream")
    fields = bare.fields()
    assert fields["ttft_ms"] is None and fields["error"] == "no upstream" and "upstream" not in fields
    assert list(fields)[-1] == "error" and "cached_tokens" not in fields
    record.cached_tokens = 32  # a prompt cache gave some of the prompt
    assert list(record.fields().items())[12:14] == [("cached_tokens", 32), ("upstream", "http://10.0.0.5:8000")]
