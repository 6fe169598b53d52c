"""`[distributed]` in the config file: defaults, and every problem as `file: key: why (got value)`."""

from __future__ import annotations

from pathlib import Path

import pytest
from dsnode.config import ConfigError, load_config


def config_text(model_dir: Path, distributed: str, model: str = 'backend = "deepspeed"',
                role: str = "central") -> str:
    return f"""[node]
role = "{role}"

[model]
name = "deepseek-r1"
path = "{model_dir}"
{model}

[distributed]
{distributed}
"""


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"architectures": ["DeepseekV3ForCausalLM"]}')
    return folder


def problems(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "dsnode.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return [str(p) for p in caught.value.problems]


GOOD = 'hosts = 2\nhost_index = 1\nleader = "10.0.0.1:29500"\nranks_per_host = 8'


def test_a_follower_section_and_its_defaults(tmp_path, model_dir):
    path = tmp_path / "dsnode.toml"
    path.write_text(config_text(model_dir, GOOD))
    section = load_config(path).distributed
    assert section is not None and not section.is_leader
    assert (section.leader_host, section.rendezvous_port, section.store_port) == ("10.0.0.1", 29500, 29501)
    assert (section.world_size, section.first_rank) == (16, 8)
    assert (section.join_timeout, section.heartbeat_timeout) == (300.0, 15.0)


def test_no_section_is_one_host(tmp_path, model_dir):
    path = tmp_path / "dsnode.toml"
    path.write_text(config_text(model_dir, "").replace("[distributed]\n", ""))
    assert load_config(path).distributed is None


@pytest.mark.parametrize(("lines", "expected"), [
    (GOOD.replace("hosts = 2", "hosts = 1"), "distributed.hosts: must be >= 2 (got 1)"),
    (GOOD.replace("host_index = 1", "host_index = 2"),
     "distributed: host_index must be below hosts = 2 (0 is the leader; got host_index = 2)"),
    (GOOD.replace("host_index = 1", "host_index = -1"), "distributed.host_index: must be >= 0 (got -1)"),
    (GOOD.replace('"10.0.0.1:29500"', '"10.0.0.1"'), "distributed.leader: must be HOST:PORT"),
    (GOOD.replace("29500", "65535"), "distributed.leader: port must be between 1 and 65534 (the next port is "
                                     "torch.distributed's store) (got '10.0.0.1:65535')"),
    (GOOD.replace("ranks_per_host = 8", "ranks_per_host = 0"),
     "distributed.ranks_per_host: must be > 0 (got 0)"),
    (GOOD + "\nheartbeat_timeout = 1", "distributed.heartbeat_timeout: must be >= 3 (got 1)"),
    (GOOD + "\nbogus = 1", "distributed.bogus: unknown key (got 1)"),
    (GOOD.replace("ranks_per_host = 8", ""), "distributed.ranks_per_host: required key is missing"),
])
def test_section_errors_name_the_key_and_value(tmp_path, model_dir, lines, expected):
    found = problems(tmp_path, config_text(model_dir, lines))
    assert any(expected in p for p in found), found


@pytest.mark.parametrize(("model", "role", "expected"), [
    ('backend = "transformers"', "central", "model.backend: [distributed] needs backend = \"deepspeed\" "
                                           "(got 'transformers')"),
    ('backend = "deepspeed"\ntensor_parallel = 4', "central",
     "model.tensor_parallel: with [distributed], tensor_parallel is the ranks of this host and must equal "
     "ranks_per_host = 8 (got 4); leave it out"),
    ('backend = "deepspeed"\nquantization = "nf4"', "central",
     "model.quantization: nf4 (bitsandbytes) runs in one rank and cannot span hosts (got 'nf4')"),
    ('backend = "deepspeed"', "edge", "node.role: [distributed] needs role = \"central\" (got 'edge')"),
])
def test_what_the_section_needs_of_the_others(tmp_path, model_dir, model, role, expected):
    found = problems(tmp_path, config_text(model_dir, GOOD, model=model, role=role))
    assert [p for p in found if expected in p], found
    assert all(p.startswith(str(tmp_path / "dsnode.toml") + ": ") for p in found)
