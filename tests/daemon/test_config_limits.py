"""`[routing] max_answer_bytes` and `max_event_bytes`: documented defaults, and a bad value reported
with the file, the key and the value."""

from __future__ import annotations

import pytest

from tests.daemon.test_config import minimal, model_dir, problems_of, write  # noqa: F401 (a fixture)


def test_the_upstream_answer_caps_have_their_documented_defaults(tmp_path, model_dir):
    from dsnode.config import load_config

    routing = load_config(write(tmp_path, minimal(model_dir))).routing
    assert (routing.max_answer_bytes, routing.max_event_bytes) == (16 * 1024 * 1024, 1024 * 1024)
    routing = load_config(write(tmp_path, minimal(model_dir, "[routing]\nmax_answer_bytes = 1024\n"))).routing
    assert routing.max_answer_bytes == 1024


@pytest.mark.parametrize("key, value, why", [
    ("max_answer_bytes", "0", "must be > 0 (got 0)"),
    ("max_event_bytes", '"1MiB"', "must be an integer (got '1MiB')"),
])
def test_a_bad_cap_names_file_key_and_value(tmp_path, model_dir, key, value, why):
    path = write(tmp_path, minimal(model_dir, f"[routing]\n{key} = {value}\n"))
    assert problems_of(path) == [f"{path}: routing.{key}: {why}"]
