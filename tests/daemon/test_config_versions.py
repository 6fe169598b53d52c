"""`[routing.split]`, `[routing.canary]`, `[model] label / switch`, `[debug]`: what `dsnode check-config`
says of each bad value (file: key: why (got value)), and the version a good config serves. What
only the cluster can tell (a model or version no node serves) is `--cluster`'s and the reload's:
tests/daemon/ops/test_canary_cli.py and tests/daemon/test_model_switch.py."""

from __future__ import annotations

from dsnode.cli import main
from dsnode.config import load_config
from dsnode.node import Node
from dsnode.probe import probe_host
from dsnode.versions import ServedVersion, served_version

from tests.daemon.ops.test_canary_cli import VERSION, store_version
from tests.support.fake_nodes import stub_model_dir  # noqa: F401 - a session fixture


def config(model_dir, model_extra: str = "", rest: str = "") -> str:
    return f"""[node]
name = "edge-1"
role = "edge"

[model]
name = "deepseek-r1"
path = "{model_dir}"
backend = "transformers"
{model_extra}

{rest}
"""


def check(tmp_path, text: str, capsys) -> tuple[int, list[str]]:
    path = tmp_path / "dsnode.toml"
    path.write_text(text)
    code = main(["check-config", str(path)])
    return code, [line.removeprefix(f"{path}: ") for line in capsys.readouterr().out.splitlines()]


def test_every_bad_split_and_canary_value_is_named(tmp_path, stub_model_dir, capsys):  # noqa: F811
    code, lines = check(tmp_path, config(stub_model_dir, 'label = "two words"\nswitch = "later"', """
[routing.split.deepseek-r1]
"2026-11" = 90
"2026-12" = 20

[routing.split."not a model!"]
"v1" = 100

[routing.split.other]
"v 1" = 50
"v2" = "50"
"v3" = 150

[routing.split.empty]

[routing.canary]
error_rate_margin = -0.05
ttft_p95_margin = -1
window = 0

[debug]
inject_errors = 1.5
"""), capsys)
    assert code == 1
    assert sorted(lines) == sorted([
        "model.label: must be 1-64 characters: letters, digits and . _ - (starting with a letter or digit) "
        "(got 'two words')",
        "model.switch: must be one of 'auto', 'beside' or 'drain' (got 'later')",
        "routing.split.other.v2: must be an integer (got '50')",
        "routing.split.other.v3: must be <= 100 (got 150)",
        "routing.canary.window: must be > 0 (got 0)",
        "routing.canary.error_rate_margin: must be >= 0 (got -0.05)",
        "routing.canary.ttft_p95_margin: must be >= 0 (got -1)",
        "debug.inject_errors: must be < 1 (got 1.5)",
        "routing.split.deepseek-r1: the shares must sum to 100 (got 90 + 20 = 110)",
        "routing.split.not a model!: is not a model name (got 'not a model!')",
        "routing.split.other.v 1: is not a version id or label (got 'v 1')",
        "routing.split.empty: names no version; give each version its percent, e.g. \"2026-12\" = 10 "
        "(got an empty table)",
    ])


def test_min_requests_must_fit_in_the_window(tmp_path, stub_model_dir, capsys):  # noqa: F811
    code, lines = check(tmp_path, config(stub_model_dir, rest="[routing.canary]\nwindow = 10\nmin_requests = 11\n"),
                        capsys)
    assert (code, lines) == (1, ["routing.canary.min_requests: must be <= window (10): a window holds no more "
                                 "requests (got 11)"])


def test_a_good_split_is_accepted(tmp_path, stub_model_dir, capsys):  # noqa: F811
    code, lines = check(tmp_path, config(stub_model_dir, rest="""
[routing.split.deepseek-r1]
"2026-11" = 90
"3865e12a1eb7" = 10
"old" = 0

[routing.canary]
min_requests = 20
error_rate_margin = 0
"""), capsys)
    assert (code, lines) == (0, ["ok"])


def test_the_served_version_comes_from_the_store_and_the_label_from_the_config(tmp_path, stub_model_dir):  # noqa: F811
    folder = store_version(tmp_path / "store" / "deepseek-r1" / VERSION, stub_model_dir)
    path = tmp_path / "a.toml"
    path.write_text(config(folder))
    loaded = load_config(path)
    assert loaded.model_version is not None and loaded.model_version.version == VERSION
    assert served_version(loaded.model_version, loaded.model.label) == ServedVersion(VERSION, "v1")
    path.write_text(config(folder, 'label = "2026-12"'))
    relabelled = load_config(path)
    assert served_version(relabelled.model_version, relabelled.model.label) == ServedVersion(VERSION, "2026-12")
    path.write_text(config(stub_model_dir, 'label = "2026-12"'))  # no store: the label is the id
    plain = load_config(path)
    assert served_version(plain.model_version, plain.model.label) == ServedVersion("2026-12", "2026-12")
    path.write_text(config(stub_model_dir))
    assert Node(load_config(path), engine=None, host=probe_host()).served == ServedVersion("unversioned")  # type: ignore[arg-type]
