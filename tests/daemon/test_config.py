"""Config parsing and validation: every problem is reported as `file: key: why (got value)`."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from dsnode.config import Config, ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"architectures": ["Qwen2ForCausalLM"]}')
    return folder


def write(tmp_path: Path, text: str, name: str = "dsnode.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def minimal(model_dir: Path, extra: str = "", node: str = "", model: str = "") -> str:
    return f"""[node]
role = "central"
{node}
[model]
name = "m"
path = "{model_dir}"
backend = "transformers"
{model}
{extra}
"""


def problems_of(path: Path, **kwargs) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, **kwargs)
    return [str(p) for p in info.value.problems]


def test_minimal_file_gets_documented_defaults(tmp_path, model_dir):
    config = load_config(write(tmp_path, minimal(model_dir)))
    assert config.node.listen == "0.0.0.0:8000"
    assert config.batching.max_batch_tokens == 32768
    assert config.routing.long_prompt_tokens == 2048
    assert config.routing.upstream == ()
    assert config.node.name  # the host name
    assert config.source == tmp_path / "dsnode.toml"


def test_config_is_immutable(tmp_path, model_dir):
    config = load_config(write(tmp_path, minimal(model_dir)))
    with pytest.raises(Exception):
        config.batching.max_batch_tokens = 1  # type: ignore[misc]
    with pytest.raises(Exception):
        config.node = config.node  # type: ignore[misc]


def test_product_example_keys_parse(tmp_path, model_dir):
    config = load_config(write(tmp_path, f"""
[node]
name = "edge-1"
role = "edge"
listen = "0.0.0.0:8000"

[model]
name = "deepseek-r1-distill-7b-int8"
path = "{model_dir}"
backend = "transformers"
max_context = 4096

[batching]
max_batch_tokens = 32768

[routing]
long_prompt_tokens = 2048

[[routing.upstream]]
url = "http://192.168.1.10:8000"
weight = 3

[[routing.upstream]]
url = "http://192.168.1.11:8000/"
weight = 1
"""))
    assert [(u.url, u.weight) for u in config.routing.upstream] == [
        ("http://192.168.1.10:8000", 3),
        ("http://192.168.1.11:8000", 1),
    ]
    assert (config.node.host, config.node.port) == ("0.0.0.0", 8000)
    assert config.model.max_context == 4096


def test_relative_paths_are_relative_to_the_file(tmp_path, model_dir):
    (tmp_path / "keys").write_text("sk-test-0123456789abcdef\n")
    text = minimal(Path("model"), extra='[auth]\napi_keys_file = "keys"\n')
    config = load_config(write(tmp_path, text))
    assert config.model.path == tmp_path / "model"
    assert config.auth.api_keys_file == tmp_path / "keys"


@pytest.mark.parametrize(
    "snippet, key, why",
    [
        ('[node]\nrole = "edgy"', "node.role", "must be one of 'edge' or 'central' (got 'edgy')"),
        ('[node]\nrole = "edge"\nnmae = "x"', "node.nmae", "unknown key (got 'x')"),
        ('[node]\nrole = "edge"\nlisten = "nohost"', "node.listen", "must be HOST:PORT"),
        ('[node]\nrole = "edge"\nlisten = "1.2.3.4:99999"', "node.listen", "port must be between 0 and 65535"),
        ('[node]\nrole = "edge"\ndrain_timeout = 0', "node.drain_timeout", "must be > 0 (got 0)"),
        ('[node]\nrole = "edge"\nadvertise_url = "10.0.0.1:8000"', "node.advertise_url", "must start with http://"),
    ],
)
def test_node_section_errors(tmp_path, model_dir, snippet, key, why):
    text = snippet + f'\n[model]\nname = "m"\npath = "{model_dir}"\nbackend = "transformers"\n'
    path = write(tmp_path, text)
    problems = problems_of(path)
    assert any(p.startswith(f"{path}: {key}: ") and why in p for p in problems), problems


@pytest.mark.parametrize(
    "model_lines, key, why",
    [
        ('backend = "vllm"', "model.backend", "must be one of 'onnx', 'deepspeed' or 'transformers' (got 'vllm')"),
        ('backend = "transformers"\nmax_context = "big"', "model.max_context", "must be an integer (got 'big')"),
        ('backend = "transformers"\nmax_context = -5', "model.max_context", "must be > 0 (got -5)"),
        ('backend = "transformers"\nquantization = "int3"', "model.quantization", "(got 'int3')"),
        ('backend = "transformers"\ntensor_parallel = 0', "model.tensor_parallel", "must be > 0 (got 0)"),
        ('backend = "transformers"\ndevice = "tpu"', "model.device", "(got 'tpu')"),
        ('backend = "transformers"\nthreads = 1.5', "model.threads", "must be an integer (got 1.5)"),
    ],
)
def test_model_section_errors(tmp_path, model_dir, model_lines, key, why):
    path = write(tmp_path, f'[node]\nrole = "central"\n[model]\nname = "m"\npath = "{model_dir}"\n{model_lines}\n')
    problems = problems_of(path)
    assert any(p.startswith(f"{path}: {key}: ") and why in p for p in problems), problems


def test_bad_model_name(tmp_path, model_dir):
    path = write(tmp_path, minimal(model_dir).replace('name = "m"', 'name = "has spaces"'))
    assert any("model.name: must be 1-128 characters" in p and "'has spaces'" in p for p in problems_of(path))


def test_missing_required_keys(tmp_path):
    path = write(tmp_path, "[node]\n[model]\n")
    problems = problems_of(path)
    for key in ("node.role", "model.name", "model.path", "model.backend"):
        assert f"{path}: {key}: required key is missing" in problems


def test_missing_sections(tmp_path):
    path = write(tmp_path, "")
    assert problems_of(path) == [f"{path}: node: required key is missing", f"{path}: model: required key is missing"]


def test_missing_model_folder(tmp_path):
    path = write(tmp_path, minimal(tmp_path / "nowhere"))
    assert problems_of(path) == [f"{path}: model.path: no such model folder (got '{tmp_path / 'nowhere'}')"]


def test_model_folder_of_the_wrong_kind(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    path = write(tmp_path, minimal(folder).replace('"transformers"', '"onnx"'))
    (problem,) = problems_of(path)
    assert "model.path: is not a converted ONNX model" in problem and "manifest.json" in problem
    path = write(tmp_path, minimal(folder), "b.toml")
    (problem,) = problems_of(path)
    assert "model.path: is not a Hugging Face model folder: no config.json" in problem


def test_skip_paths_validates_everything_else(tmp_path):
    path = write(tmp_path, minimal(tmp_path / "nowhere"))
    assert load_config(path, check_paths=False).model.path == tmp_path / "nowhere"
    bad = write(tmp_path, minimal(tmp_path / "nowhere", node="listen = 'x'"), "bad.toml")
    assert [p for p in problems_of(bad, check_paths=False) if "model.path" in p] == []
    assert any("node.listen" in p for p in problems_of(bad, check_paths=False))


@pytest.mark.parametrize(
    "upstream, key, why",
    [
        ('url = "ftp://x"', "routing.upstream[0].url", "must start with http:// or https:// (got 'ftp://x')"),
        ('url = "http://"', "routing.upstream[0].url", "has no host"),
        ('url = "http://a:notaport"', "routing.upstream[0].url", "has an invalid port"),
        ('url = "http://a:8000/v1"', "routing.upstream[0].url", "without a path"),
        ('url = "http://a:8000"\nweight = 0', "routing.upstream[0].weight", "must be > 0 (got 0)"),
        ('url = "http://a:8000"\nweight = -2', "routing.upstream[0].weight", "must be > 0 (got -2)"),
        ('url = "http://a:8000"\nweight = 1.5', "routing.upstream[0].weight", "must be an integer (got 1.5)"),
        ('url = "http://a:8000"\nwieght = 2', "routing.upstream[0].wieght", "unknown key (got 2)"),
        ('weight = 2', "routing.upstream[0].url", "required key is missing"),
    ],
)
def test_upstream_errors(tmp_path, model_dir, upstream, key, why):
    path = write(tmp_path, minimal(model_dir, extra=f"[[routing.upstream]]\n{upstream}\n"))
    problems = problems_of(path)
    assert any(p.startswith(f"{path}: {key}: ") and why in p for p in problems), problems


def test_duplicate_upstreams(tmp_path, model_dir):
    extra = '[[routing.upstream]]\nurl = "http://a:1"\n[[routing.upstream]]\nurl = "http://a:1/"\n'
    (problem,) = problems_of(write(tmp_path, minimal(model_dir, extra=extra)))
    assert "routing: upstream urls must be unique; repeated: http://a:1" in problem


def test_every_problem_is_reported_at_once(tmp_path):
    path = write(tmp_path, """
[node]
role = "edgy"
listen = "x"
[model]
name = "m"
path = "/definitely/not/here"
backend = "onnx"
[batching]
max_batch_tokens = 0
max_queue = -1
[[routing.upstream]]
url = "http://a:1"
weight = 0
""")
    problems = problems_of(path)
    keys = {p.split(": ")[1] for p in problems}
    assert keys == {"node.role", "node.listen", "model.path", "batching.max_batch_tokens", "batching.max_queue",
                    "routing.upstream[0].weight"}
    assert all(p.startswith(f"{path}: ") for p in problems)


def test_wrong_types_for_tables(tmp_path, model_dir):
    path = write(tmp_path, 'batching = "big"\n' + minimal(model_dir))
    assert any(p.endswith("batching: must be a table (got 'big')") for p in problems_of(path))
    path = write(tmp_path, minimal(model_dir, extra='[routing]\nupstream = "http://a:1"\n'), "b.toml")
    assert any("routing.upstream: must be a list" in p for p in problems_of(path))


def test_syntax_error_names_line(tmp_path):
    path = write(tmp_path, "[node\nrole = 1\n")
    (problem,) = problems_of(path)
    assert problem.startswith(f"{path}: (syntax): invalid TOML:") and "line 1" in problem


def test_unreadable_file(tmp_path):
    (problem,) = problems_of(tmp_path / "absent.toml")
    assert problem == f"{tmp_path / 'absent.toml'}: (file): cannot read: No such file or directory"


def test_auth_and_tls_files(tmp_path, model_dir):
    extra = '[auth]\napi_keys_file = "/nope/keys"\n[tls]\ncert_file = "/nope/cert.pem"\n'
    problems = problems_of(write(tmp_path, minimal(model_dir, extra=extra)))
    assert any("auth.api_keys_file: no such file (got '/nope/keys')" in p for p in problems)
    assert any("tls: cert_file and key_file must be given together" in p for p in problems)
    assert any("tls.cert_file: no such file" in p for p in problems)


def test_onnx_backend_refuses_bitsandbytes_quantization(tmp_path):
    folder = tmp_path / "onnx"
    folder.mkdir()
    (folder / "manifest.json").write_text("{}")
    text = minimal(folder).replace('"transformers"', '"onnx"') + 'quantization = "int8"\n'
    text = text.replace('backend = "onnx"\n', 'backend = "onnx"\nquantization = "int8"\n', 1)
    (problem,) = problems_of(write(tmp_path, text.replace('quantization = "int8"\n', "", 1)))
    assert "model.quantization:" in problem and "(got 'int8')" in problem


def test_redacted_dump_is_json_ready(tmp_path, model_dir):
    config = load_config(write(tmp_path, minimal(model_dir)))
    dumped = config.redacted()
    assert dumped["model"]["path"] == str(model_dir)
    assert isinstance(Config.model_validate(config.model_dump()), Config)


@pytest.mark.parametrize("example", sorted((REPO / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_example_configs_pass_check_config(tmp_path, example, model_dir):
    """Each example is valid as written (`--skip-paths`: it targets another host) and passes the full check
    once its model folder exists."""
    run = subprocess.run([sys.executable, "-m", "dsnode.cli", "check-config", "--skip-paths", str(example)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    text = example.read_text()
    original = re.search(r'^path = "([^"]+)"', text, re.M)
    assert original, "an example must name its model folder"
    backend = re.search(r'^backend = "([^"]+)"', text, re.M).group(1)
    if backend == "onnx":
        (model_dir / "manifest.json").write_text("{}")
    local = write(tmp_path, text.replace(original.group(1), str(model_dir)), example.name)
    run = subprocess.run([sys.executable, "-m", "dsnode.cli", "check-config", str(local)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.strip() == f"{local}: ok"


def test_check_config_cli_prints_every_problem_and_exits_1(tmp_path):
    path = write(tmp_path, '[node]\nrole = "x"\n[model]\nname = "m"\npath = "/nope"\nbackend = "onnx"\n')
    run = subprocess.run([sys.executable, "-m", "dsnode.cli", "check-config", str(path)], capture_output=True, text=True)
    assert run.returncode == 1
    lines = run.stdout.strip().splitlines()
    assert f"{path}: node.role: must be one of 'edge' or 'central' (got 'x')" in lines
    assert f"{path}: model.path: no such model folder (got '/nope')" in lines


def test_serve_refuses_an_invalid_file_with_the_same_messages(tmp_path):
    path = write(tmp_path, '[node]\nrole = "x"\n[model]\nname = "m"\npath = "/nope"\nbackend = "onnx"\n')
    run = subprocess.run([sys.executable, "-m", "dsnode.cli", "serve", "--config", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 1
    assert f"{path}: node.role: must be one of 'edge' or 'central' (got 'x')" in run.stdout
    assert f"{path}: model.path: no such model folder (got '/nope')" in run.stdout


def test_auth_limits_and_timeout_defaults(tmp_path, model_dir):
    config = load_config(write(tmp_path, minimal(model_dir)))
    assert config.auth.api_keys_file is None and config.auth.cluster_secret_file is None
    assert config.auth.max_clock_skew == 30.0
    assert config.limits.max_concurrent_per_key is None and config.limits.body_timeout == 60.0
    assert config.node.idle_timeout == 75.0


@pytest.mark.parametrize(
    "extra, key, why",
    [
        ("[auth]\nmax_clock_skew = 0", "auth.max_clock_skew", "must be > 0 (got 0)"),
        ("[limits]\nmax_concurrent_per_key = 0", "limits.max_concurrent_per_key", "must be > 0 (got 0)"),
        ('[limits]\nbody_timeout = "1m"', "limits.body_timeout", "must be a number (got '1m')"),
        ("[limits]\nbody_timeout = -1", "limits.body_timeout", "must be > 0 (got -1)"),
        ("[auth]\napi_key_file = 'x'", "auth.api_key_file", "unknown key (got 'x')"),
    ],
)
def test_auth_and_limits_errors(tmp_path, model_dir, extra, key, why):
    path = write(tmp_path, minimal(model_dir, extra=extra))
    problems = problems_of(path)
    assert any(p.startswith(f"{path}: {key}: ") and why in p for p in problems), problems


def test_node_idle_timeout_must_be_positive(tmp_path, model_dir):
    path = write(tmp_path, minimal(model_dir, node="idle_timeout = 0"))
    assert f"{path}: node.idle_timeout: must be > 0 (got 0)" in problems_of(path)


def test_key_and_secret_files_are_checked_line_by_line_without_quoting_them(tmp_path, model_dir):
    (tmp_path / "keys").write_text("# ops\nalice: sk-alice-0123456789abcdef\nbob: tiny\n")
    (tmp_path / "secret").write_text("not-long-enough\n")
    extra = '[auth]\napi_keys_file = "keys"\ncluster_secret_file = "secret"\n'
    path = write(tmp_path, minimal(model_dir, extra=extra))
    problems = problems_of(path)
    assert f"{path}: auth.api_keys_file: {tmp_path / 'keys'}: line 3: a key needs at least 16 characters " \
           "(make one with `openssl rand -hex 24`)" in problems
    assert f"{path}: auth.cluster_secret_file: {tmp_path / 'secret'}: line 1: a secret needs at least 32 " \
           "characters (make one with `openssl rand -hex 32`)" in problems
    assert not any("tiny" in p or "not-long-enough" in p for p in problems)
    assert load_config(path, check_paths=False).auth.api_keys_file == tmp_path / "keys"  # --skip-paths
