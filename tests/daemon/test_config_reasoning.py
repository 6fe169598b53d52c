"""`[model] reasoning`: validated like every key, documented in the README's table."""

from __future__ import annotations

from pathlib import Path

import pytest
from dsnode.config import ConfigError, load_config

from tests.daemon.test_config import minimal, model_dir, write  # noqa: F401  (model_dir is a fixture)

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("value", ["auto", "deepseek_r1", "none"])
def test_the_settings(tmp_path, model_dir, value):  # noqa: F811
    config = load_config(write(tmp_path, minimal(model_dir, model=f'reasoning = "{value}"')))
    assert config.model.reasoning == value


def test_a_bad_value_is_named_with_the_choices(tmp_path, model_dir):  # noqa: F811
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, minimal(model_dir, model='reasoning = "r1"')))
    [problem] = info.value.problems
    assert problem.key == "model.reasoning" and "deepseek_r1" in problem.why and "'r1'" in problem.why


def test_documented_in_the_readme():
    readme = (REPO / "README.md").read_text()
    assert "| | `reasoning` | `auto` |" in readme
