"""One host's part in a `[distributed]` group, as the deepspeed engine uses it.

The engine forms the group (`form`: the rendezvous of `dsnode.central.rendezvous`, then the heartbeat
link of `dsnode.central.group_link`) before it starts its ranks, gives each rank its global place in
torch.distributed's world (`rank_env`: host h's local rank r is global rank h × ranks_per_host + r;
global rank 0, on the leader, runs the TCPStore every rank meets at), and describes the group for
`/cluster` (`describe`).
"""

from __future__ import annotations

import hashlib
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from dsnode.config import Config, ModelSection
from dsnode.distributed import DistributedSection

from .group_link import GroupLink
from .rendezvous import Formed, Member, join, lead


@dataclass(frozen=True)
class HostGroup:
    settings: DistributedSection
    node: str  # [node] name
    url: str  # how clients reach this node's HTTP port
    keys: tuple[bytes, ...] | None  # the cluster secrets ([auth] cluster_secret_file), the signing one first

    @classmethod
    def from_config(cls, config: Config) -> "HostGroup | None":
        if config.distributed is None:
            return None
        keys = config.secrets().cluster if config.auth.cluster_secret_file else None
        return cls(config.distributed, config.node.name, _node_url(config), keys)

    @property
    def is_leader(self) -> bool:
        return self.settings.is_leader

    def form(self, model: ModelSection, dtype: str, on_lost: Callable[[str], None]) -> GroupLink:
        """Meet the other hosts (bounded by join_timeout); the link is running when this returns."""
        s = self.settings
        me = Member(s.host_index, self.node, self.url, model.name, _config_sha256(model.path),
                    s.ranks_per_host, s.hosts, dtype)
        formed: Formed = lead(s, me, self.keys) if s.is_leader else join(s, me, self.keys)
        return GroupLink(formed, s.host_index, s.heartbeat_timeout, on_lost).start()

    def rank_env(self, base: dict[str, str], local_rank: int, extra: dict[str, str]) -> dict[str, str]:
        """torch.distributed's environment contract for one local rank of this host."""
        s = self.settings
        return {
            **base,
            **extra,
            "MASTER_ADDR": s.leader_host,
            "MASTER_PORT": str(s.store_port),
            "RANK": str(s.first_rank + local_rank),
            "LOCAL_RANK": str(local_rank),
            "WORLD_SIZE": str(s.world_size),
            "LOCAL_WORLD_SIZE": str(s.ranks_per_host),
            "GROUP_RANK": str(s.host_index),
        }

    def describe(self, link: GroupLink) -> dict[str, Any]:
        """The group for `/cluster` (ModelInfo.extra["distributed"]) and `dsnode status`."""
        s, per = self.settings, self.settings.ranks_per_host
        return {
            "role": "leader" if s.is_leader else "follower",
            "hosts": s.hosts,
            "host_index": s.host_index,
            "ranks_per_host": per,
            "world_size": s.world_size,
            "rendezvous": s.leader,
            "members": [
                {"host_index": m.host_index, "node": m.node, "url": m.url,
                 "ranks": [m.host_index * per, m.host_index * per + per - 1]}
                for m in link.formed.members
            ],
        }


def _config_sha256(folder: Path) -> str:
    """Hosts must serve the same checkpoint; its config.json is the cheap witness."""
    return hashlib.sha256((Path(folder) / "config.json").read_bytes()).hexdigest()


def _node_url(config: Config) -> str:
    if config.node.advertise_url:
        return config.node.advertise_url
    host, port = config.node.host, config.node.port
    if host in ("0.0.0.0", "::", ""):
        host = socket.gethostname()
    scheme = "https" if config.tls.cert_file else "http"
    return f"{scheme}://{'[' + host + ']' if ':' in host else host}:{port}"
