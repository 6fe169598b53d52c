"""`dsnode status [--url URL] [--json]`: the cluster as one node sees it, from its `GET /cluster`.

`/cluster` answers `{"node": <its advertisement>, "peers": [<UpstreamState as JSON>, ...]}`; this
command turns it into one row per node (the node asked first, then its upstreams) and prints them as
a table, or as JSON for scripts. Exit codes: 0 when the node answered, 1 when it could not be reached
or did not answer like a dsnode node.
"""

from __future__ import annotations

import argparse
import json
import ssl
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from .splits_view import format_splits

DEFAULT_URL = "http://127.0.0.1:8000"
EXIT_OK = 0
EXIT_UNREACHABLE = 1


@dataclass(frozen=True)
class NodeRow:
    node: str
    url: str | None
    role: str | None
    state: str  # "ready" | "not ready" | "down" | "unreachable" | "not polled"
    this_node: bool
    weight: int | None  # configured (peers only)
    effective_weight: int | None
    gpus: list[str]
    models: list[str]
    context: int | None
    waiting: int | None
    running: int | None
    tokens_per_second: float | None
    last_seen_s: float | None  # seconds ago (0 for the node asked)
    error: str | None = None
    weights_per_rank: tuple[int, ...] = ()  # bytes of model weights each rank holds (central engines)
    versions: tuple[str, ...] = ()  # the version of each model it serves: "id" or "id (label)"


class Unreachable(Exception):
    pass


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser("status", help="the cluster as one node sees it: nodes, health, load")
    add_node_options(p, url_help="the node to ask", json_help="print JSON instead of a table", timeout=5.0,
                     secret_help="ask as a peer node would")
    p.set_defaults(func=run)


def add_node_options(p: argparse.ArgumentParser, *, url_help: str, json_help: str, timeout: float,
                     secret_help: str) -> None:
    """The options of a command that asks a node: where, how long, with which credential."""
    p.add_argument("--url", default=DEFAULT_URL, help=f"{url_help} (default {DEFAULT_URL})")
    p.add_argument("--json", action="store_true", help=json_help)
    p.add_argument("--timeout", type=float, default=timeout, help=f"seconds to wait for the node (default {timeout:g})")
    p.add_argument("--secret-file", type=Path, metavar="PATH",
                   help=f"the cluster secret ([auth] cluster_secret_file): {secret_help}")
    p.add_argument("--api-key-file", type=Path, metavar="PATH", help="a file holding an API key")
    p.add_argument("--ca-file", type=Path, metavar="PATH", help="CA certificates for an https:// --url")


def run(args: argparse.Namespace) -> int:
    url = args.url.rstrip("/")
    try:
        sign = peer_signer(getattr(args, "secret_file", None))
        credentials = {} if sign else api_key_headers(getattr(args, "api_key_file", None))
        cluster = fetch_cluster(url, args.timeout, credentials, getattr(args, "ca_file", None), sign=sign)
    except Unreachable as exc:
        print(f"dsnode status: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    rows = cluster_rows(cluster, now=time.time())
    if args.json:
        print(json.dumps({"url": url, "nodes": [asdict(r) for r in rows], "cluster": cluster}, indent=2))
    else:
        print(format_table(rows))
        splits = cluster.get("splits")
        if isinstance(splits, list) and splits:
            print("\n" + format_splits(splits))
    return EXIT_OK


Signer = Callable[["tuple[str, str] | None"], dict[str, str]]  # the node's (boot, name) -> headers


def peer_signer(secret_file: Path | None, method: str = "GET", path: str = "/cluster",
                client: str = "dsnode-status") -> Signer | None:
    """Ask as a peer: a fresh credential for each try, made for the node asked once it has said
    which node (and boot) it is. Raises Unreachable when the file cannot be used."""
    if secret_file is None:
        return None
    from ..cluster.peer_auth import PeerAuth
    from ..secrets import SecretFileError, read_cluster_secrets

    try:
        secrets = read_cluster_secrets(secret_file)
    except SecretFileError as exc:
        raise Unreachable(f"--secret-file {secret_file}: {'; '.join(exc.problems)}") from None
    peer = PeerAuth(secrets, client, 0.0)
    return lambda to: peer.headers(method, path, to)


def api_key_headers(api_key_file: Path | None) -> dict[str, str]:
    """Ask with an API key (`Authorization: Bearer`). Raises Unreachable when the file cannot be read."""
    if api_key_file is None:
        return {}
    try:
        api_key = api_key_file.read_text().strip()
    except OSError as exc:
        raise Unreachable(f"--api-key-file {api_key_file}: cannot read: {exc.strerror or exc}") from None
    return {"Authorization": f"Bearer {api_key}"}


def fetch_cluster(url: str, timeout: float, headers: dict[str, str] | None = None,
                  ca_file: Path | None = None, sign: Signer | None = None) -> dict[str, Any]:
    context = ssl.create_default_context(cafile=str(ca_file)) if ca_file is not None else None
    to = None
    for _ in range(2):  # a peer credential made for no node yet is challenged: sign for the one named
        try:
            body = _get_cluster(url, timeout, {**(headers or {}), **(sign(to) if sign else {})}, context)
            break
        except _Challenged as exc:
            if sign is None or exc.binding == to:
                raise exc.unreachable from None
            to = exc.binding
    else:
        raise Unreachable(f"{url}/cluster refused the peer credential made for it (HTTP 401): "
                          "is the cluster secret the same?")
    return _advertised_cluster(url, body)


class _Challenged(Exception):
    def __init__(self, binding: "tuple[str, str] | None", unreachable: Unreachable) -> None:
        self.binding = binding
        self.unreachable = unreachable


def _get_cluster(url: str, timeout: float, headers: dict[str, str], context: ssl.SSLContext | None) -> bytes:
    from ..cluster.peer_auth import challenge_of
    from ..headers import PEER_CHALLENGE

    try:
        request = urllib.request.Request(f"{url}/cluster", headers=headers)
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            return bytes(response.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            refused = Unreachable(f"{url}/cluster answered HTTP 401: this node needs a credential "
                                  "(--secret-file with the cluster secret, or --api-key-file)")
            raise _Challenged(challenge_of(exc.headers.get(PEER_CHALLENGE)), refused) from None
        raise Unreachable(f"{url}/cluster answered HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise Unreachable(
            f"cannot reach {url} ({reason}). Is dsnode running there? (systemctl status dsnode)"
        ) from None


def _advertised_cluster(url: str, body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except ValueError:
        raise Unreachable(f"{url}/cluster did not answer JSON: is that a dsnode node?") from None
    if not isinstance(data, dict) or not isinstance(data.get("node"), dict):
        raise Unreachable(
            f"{url}/cluster answered JSON without a 'node' advertisement: is that a dsnode node?"
        )
    return data


# --- rows -------------------------------------------------------------------------------------------
def cluster_rows(cluster: dict[str, Any], now: float) -> list[NodeRow]:
    rows = [_advert_row(cluster["node"])] + _group_rows(cluster["node"])
    for peer in cluster.get("peers") or []:
        if isinstance(peer, dict):
            rows.append(_peer_row(peer, now))
    return rows


def _advert_row(advert: dict[str, Any]) -> NodeRow:
    facts = _advert_facts(advert)
    group = _table(advert, "group")
    if group.get("role") == "follower":  # it lists no model: the leader serves it
        facts["models"] = [f"{group.get('model')} (host {group.get('host_index')})"]
    return NodeRow(
        node=str(advert.get("name", "?")),
        url=advert.get("url"),
        role=_group_role(advert.get("role"), group),
        state="ready" if advert.get("ready") else "not ready",
        this_node=True,
        weight=None,
        effective_weight=None,
        last_seen_s=0.0,
        error=None if advert.get("ready") else (advert.get("reason") or None),
        **facts,
    )


def _group_role(role: Any, group: dict[str, Any]) -> Any:
    """`central`, or `central/leader` / `central/host 1` in a `[distributed]` group."""
    if not group:
        return role
    return f"{role}/leader" if group.get("role") == "leader" else f"{role}/host {group.get('host_index')}"


def _group_rows(advert: dict[str, Any]) -> list[NodeRow]:
    """A leader's followers, as members of its group: their ranks are in the leader's model."""
    group = _table(advert, "group")
    if group.get("role") != "leader":
        return []
    ranks = [r for m in advert.get("models") or [] if isinstance(m, dict)
             for r in _table(m, "details").get("ranks") or [] if isinstance(r, dict)]
    rows = []
    for member in group.get("members") or []:
        if not isinstance(member, dict) or member.get("host_index") == 0:
            continue
        first, last = (member.get("ranks") or [0, -1])[:2]
        weights = tuple(r["weights_bytes"] for r in ranks
                        if isinstance(r.get("weights_bytes"), int) and first <= r.get("rank", -1) <= last)
        ready = bool(advert.get("ready"))  # a ready leader heard this follower within heartbeat_timeout
        rows.append(NodeRow(
            node=str(member.get("node", "?")), url=member.get("url"),
            role=f"central/host {member.get('host_index')}", state="in group" if ready else "not ready",
            this_node=False, weight=None, effective_weight=None, gpus=[],
            models=[f"{group.get('model')} (ranks {first}-{last})"], context=None, waiting=None, running=None,
            tokens_per_second=None, last_seen_s=0.0 if ready else None, weights_per_rank=weights,
        ))
    return rows


def _peer_row(peer: dict[str, Any], now: float) -> NodeRow:
    advert = _table(peer, "advert")
    last_seen = peer.get("last_seen")
    if peer.get("down"):
        state = "down"  # taken out by passive health (max_fails within fail_timeout)
    elif peer.get("reachable") is False:
        state = "unreachable"
    elif last_seen is None and peer.get("ready") is None:
        state = "not polled"
    elif not peer.get("ready"):
        state = "not ready"
    else:
        state = "ready" if peer.get("healthy", True) else "down"
    return NodeRow(
        node=str(peer.get("name") or advert.get("name") or peer.get("url", "?")),
        url=peer.get("url"),
        role=peer.get("role") or advert.get("role"),
        state=state,
        this_node=False,
        weight=peer.get("weight"),
        effective_weight=peer.get("effective_weight"),
        last_seen_s=None if last_seen is None else max(0.0, now - float(last_seen)),
        error=peer.get("last_error") or None,
        **_advert_facts(advert),
    )


def _advert_facts(advert: dict[str, Any]) -> dict[str, Any]:
    host, load = _table(advert, "host"), _table(advert, "load")
    models = [m for m in advert.get("models") or [] if isinstance(m, dict)]
    contexts = [m["max_context"] for m in models if isinstance(m.get("max_context"), int)]
    return {
        "gpus": [str(g.get("name", "GPU")) for g in host.get("gpus") or [] if isinstance(g, dict)],
        "models": [str(m.get("name")) for m in models if m.get("name")],
        "context": max(contexts) if contexts else None,
        "waiting": load.get("waiting"),
        "running": load.get("running"),
        "tokens_per_second": load.get("tokens_per_second"),
        "weights_per_rank": _weights_per_rank(models),
        "versions": tuple(_version_of(m) for m in models if isinstance(m.get("version"), str)),
    }


def _version_of(model: dict[str, Any]) -> str:
    version, label = str(model["version"]), model.get("version_label")
    return version if not isinstance(label, str) or label == version else f"{version} ({label})"


def _weights_per_rank(models: list[dict[str, Any]]) -> tuple[int, ...]:
    """From the local model's `details` (ModelInfo.extra): per rank (deepspeed), or the one device."""
    for model in models:
        details = _table(model, "details")
        ranks = [r for r in details.get("ranks") or [] if isinstance(r, dict)]
        weights = [r.get("weights_bytes") for r in ranks]
        if weights and all(isinstance(w, int) for w in weights):
            return tuple(weights)
        single = details.get("weights_bytes_per_rank", details.get("weights_bytes"))
        if isinstance(single, int):
            return (single,)
    return ()


def _table(data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key)
    return value if isinstance(value, dict) else {}


# --- table --------------------------------------------------------------------------------------
COLUMNS = (
    "NODE",
    "ROLE",
    "STATE",
    "WEIGHT",
    "GPUS",
    "MODELS",
    "VERSION",
    "CONTEXT",
    "WEIGHTS/RANK",
    "QUEUE",
    "TOK/S",
    "LAST SEEN",
    "URL",
)


def format_table(rows: list[NodeRow]) -> str:
    cells = [COLUMNS] + [_cells(r) for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    notes = [f"  {r.node}: {r.error}" for r in rows if r.error]
    if notes:
        lines += ["", "problems:"] + notes
    lines += ["", "QUEUE = waiting/running requests; WEIGHT = effective/configured; * = the node asked;",
              "WEIGHTS/RANK = model weights per rank (their range, × ranks); `--json` lists each"]
    if any(r.role and "/host " in r.role for r in rows):
        lines += ["central/host N = a follower of a [distributed] group: its ranks serve the leader's model"]
    return "\n".join(lines)


def _cells(r: NodeRow) -> tuple[str, ...]:
    weight = "-" if r.weight is None else f"{_num(r.effective_weight)}/{r.weight}"
    queue = "-" if r.waiting is None and r.running is None else f"{_num(r.waiting)}/{_num(r.running)}"
    tps = "-" if r.tokens_per_second is None else f"{r.tokens_per_second:.1f}"
    return (
        r.node + (" *" if r.this_node else ""),
        r.role or "-",
        r.state,
        weight,
        _gpus(r.gpus),
        ",".join(r.models) or "-",
        ",".join(r.versions) or "-",
        _num(r.context),
        _weights(r.weights_per_rank),
        queue,
        tps,
        _ago(r.last_seen_s, r.this_node),
        r.url or "-",
    )


def _weights(per_rank: tuple[int, ...]) -> str:
    if not per_rank:
        return "-"
    low, high = _size(min(per_rank)), _size(max(per_rank))
    spread = low if low == high else f"{low}-{high}"
    return spread if len(per_rank) == 1 else f"{spread} ×{len(per_rank)}"


def _size(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n}B"


def _gpus(names: list[str]) -> str:
    if not names:
        return "-"
    counts = {n: names.count(n) for n in names}
    return ",".join(f"{c}x{n.removeprefix('NVIDIA ').removeprefix('Tesla ')}" for n, c in counts.items())


def _ago(seconds: float | None, this_node: bool) -> str:
    if this_node:
        return "now"
    if seconds is None:
        return "never"
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.0f}h ago"


def _num(value: Any) -> str:
    return "-" if value is None else str(value)
