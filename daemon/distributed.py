"""`[distributed]`: one central model served by the ranks of several hosts (docs/central.md).

Every host runs its own `dsnode serve`; host 0 (the leader) serves the model over HTTP and listens
for the rendezvous at `leader`; the other hosts (followers) start their local ranks, join the
leader's process group and answer `/health`, `/ready` and `/cluster`. The section lives here,
apart from `dsnode.config`, which only names it; checks that involve other sections
(`cross_section_problems`) run on the raw tables, so they are reported with every other problem.

    [distributed]
    hosts = 2                     # hosts in the group
    host_index = 0                # 0: the leader; 1 .. hosts-1: followers
    leader = "10.0.0.1:29500"     # the leader's rendezvous (followers connect; the leader listens);
                                  # torch.distributed's store listens on the next port (29501)
    ranks_per_host = 8            # ranks (GPUs) on every host
    # join_timeout = 300          # seconds a host waits for the others at start
    # heartbeat_timeout = 15      # seconds of silence after which a host counts as gone
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

HostIndex = Annotated[int, Field(ge=0)]
PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
MIN_HEARTBEAT_TIMEOUT_S = 3.0  # heartbeats go every second; fewer than three missed is noise


def parse_address(value: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' → (host, port); the port must leave room for the store's (+1)."""
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^:\[\]\s]+):(\d+)", value)
    if not match:
        raise ValueError("must be HOST:PORT, the leader's address as the other hosts reach it, "
                         "e.g. 10.0.0.1:29500")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if not 1 <= port <= 65534:
        raise ValueError("port must be between 1 and 65534 (the next port is torch.distributed's store)")
    if match.group(1):
        ipaddress.IPv6Address(host)
    return host, port


class DistributedSection(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    hosts: Annotated[int, Field(ge=2)]
    host_index: HostIndex
    leader: str
    ranks_per_host: PositiveInt
    join_timeout: PositiveFloat = 300.0
    heartbeat_timeout: Annotated[float, Field(ge=MIN_HEARTBEAT_TIMEOUT_S)] = 15.0

    @field_validator("leader")
    @classmethod
    def _leader(cls, value: str) -> str:
        parse_address(value)
        return value

    @model_validator(mode="after")
    def _index_in_range(self) -> "DistributedSection":
        if self.host_index >= self.hosts:
            raise ValueError(f"host_index must be below hosts = {self.hosts} "
                             f"(0 is the leader; got host_index = {self.host_index})")
        return self

    @property
    def is_leader(self) -> bool:
        return self.host_index == 0

    @property
    def leader_host(self) -> str:
        return parse_address(self.leader)[0]

    @property
    def rendezvous_port(self) -> int:
        return parse_address(self.leader)[1]

    @property
    def store_port(self) -> int:
        """torch.distributed's TCPStore, run by global rank 0 on the leader."""
        return self.rendezvous_port + 1

    @property
    def world_size(self) -> int:
        return self.hosts * self.ranks_per_host

    @property
    def first_rank(self) -> int:
        """The global rank of this host's local rank 0."""
        return self.host_index * self.ranks_per_host


def cross_section_problems(raw: dict[str, Any]) -> list[tuple[str, str]]:
    """(key, why) for what `[distributed]` needs of the other sections: a central node on the
    deepspeed backend, with no `tensor_parallel` that disagrees with `ranks_per_host`."""
    table = raw.get("distributed")
    if not isinstance(table, dict):
        return []
    node = raw.get("node") if isinstance(raw.get("node"), dict) else {}
    model = raw.get("model") if isinstance(raw.get("model"), dict) else {}
    problems: list[tuple[str, str]] = []
    if node.get("role", "central") != "central":
        problems.append(("node.role", f"[distributed] needs role = \"central\" (got {node.get('role')!r})"))
    if model.get("backend") != "deepspeed":
        problems.append(("model.backend", "[distributed] needs backend = \"deepspeed\" "
                                          f"(got {model.get('backend')!r})"))
    tensor_parallel, ranks = model.get("tensor_parallel"), table.get("ranks_per_host")
    if tensor_parallel is not None and ranks is not None and tensor_parallel != ranks:
        problems.append(("model.tensor_parallel", f"with [distributed], tensor_parallel is the ranks of this "
                                                  f"host and must equal ranks_per_host = {ranks!r} "
                                                  f"(got {tensor_parallel!r}); leave it out"))
    if model.get("quantization") == "nf4":
        problems.append(("model.quantization", "nf4 (bitsandbytes) runs in one rank and cannot span hosts "
                                               "(got 'nf4'); use \"int8\" or \"none\""))
    return problems
