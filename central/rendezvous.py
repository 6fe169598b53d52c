"""The daemons of a host group meet before any rank starts (`[distributed]`, docs/central.md).

The leader (host 0) listens at `[distributed] leader`; each follower connects (retrying: start order
does not matter) and says who it is and what it serves. The leader admits a follower only if it
serves the same model (name and config.json), with the same rank count, host count and dtype, and
if it proves it holds the cluster secret (HMAC over the leader's fresh nonce); anything else is
refused with both values named, logged on the leader and raised on the follower. Once every host
has joined, the leader sends each follower `go` (signed over the follower's nonce, so a follower
also knows its leader holds the secret) and every daemon starts its ranks. Waits are bounded by
`join_timeout` and logged every `LOG_EVERY_S`.

The connections stay open afterwards as the group's heartbeat link (`dsnode.central.group_link`).
What the secret cannot cover: torch.distributed's own store and the gloo/NCCL sockets, which have
no authentication (docs/central.md says what the operator must do instead).
"""

from __future__ import annotations

import errno
import secrets as random_tokens
import socket
import time
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import structlog
from dsnode.distributed import DistributedSection
from dsnode.hfconfig import ModelFolderError

from .wire import Wire, WireClosed, sign, verify

log = structlog.get_logger("dsnode.central.group")

PROTOCOL = 1
HANDSHAKE_TIMEOUT_S = 10.0  # one connection's challenge and hello; the accept loop waits this long at most
RETRY_S = 1.0  # a follower tries the leader again after this
LOG_EVERY_S = 10.0  # a waiting host says so this often


class RendezvousError(ModelFolderError):
    """The group could not form; the message says why (the daemon exits 1, systemd restarts it)."""


@dataclass(frozen=True)
class Member:
    """One host as it introduces itself."""

    host_index: int
    node: str
    url: str
    model: str
    model_config_sha256: str
    ranks_per_host: int
    hosts: int
    dtype: str

    def who(self) -> str:
        return f"the leader {self.node}" if self.host_index == 0 else f"host {self.host_index} ({self.node})"


@dataclass
class Formed:
    """A formed group as one host sees it: every member, and its open connections (the leader's to
    each follower, a follower's to the leader), by host index."""

    members: list[Member]
    wires: dict[int, Wire]


# --- the leader --------------------------------------------------------------------------------------
def lead(settings: DistributedSection, me: Member, keys: Sequence[bytes] | None) -> Formed:
    """Wait for every follower; raises RendezvousError when `join_timeout` passes first."""
    server = _listen(settings)
    try:
        joined = _admit_followers(server, settings, me, keys)
    finally:
        server.close()
    members = [me] + [joined[i][1] for i in sorted(joined)]
    for index, (wire, _, their_nonce) in joined.items():
        go: dict[str, Any] = {"type": "go", "members": [asdict(m) for m in members]}
        if keys:
            go["mac"] = sign(keys[0], go, their_nonce)
        wire.send(go)
    log.info("group_formed", role="leader", hosts=settings.hosts, world_size=settings.world_size,
             members=[m.node for m in members])
    return Formed(members, {index: wire for index, (wire, _, _) in joined.items()})


def _listen(settings: DistributedSection) -> socket.socket:
    host, port = settings.leader_host, settings.rendezvous_port
    try:
        return socket.create_server((host, port), family=_family(host))
    except OSError as exc:
        raise RendezvousError(_bind_problem(settings, exc)) from None


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _admit_followers(server: socket.socket, settings: DistributedSection, me: Member,
                     keys: Sequence[bytes] | None) -> dict[int, tuple[Wire, Member, str]]:
    started = time.monotonic()
    deadline, next_log = started + settings.join_timeout, started
    joined: dict[int, tuple[Wire, Member, str]] = {}
    last_refusal = ""
    while len(joined) < settings.hosts - 1:
        now = time.monotonic()
        missing = [i for i in range(1, settings.hosts) if i not in joined]
        if now >= deadline:
            for wire, _, _ in joined.values():
                wire.close()
            raise RendezvousError(_leader_timed_out(settings, missing, last_refusal))
        if now >= next_log:
            log.info("rendezvous_waiting", role="leader", listen=settings.leader, missing_hosts=missing,
                     waited_s=round(now - started), timeout_s=settings.join_timeout)
            next_log = now + LOG_EVERY_S
        server.settimeout(max(0.01, min(deadline, next_log) - now))
        try:
            sock, address = server.accept()
        except socket.timeout:
            continue
        wire = Wire(sock, f"{address[0]}:{address[1]}")
        try:
            member, their_nonce = _admit(wire, settings, me, keys)
        except RendezvousError as exc:
            last_refusal = str(exc)
            log.warning("rendezvous_refused", role="leader", peer=wire.peer, why=last_refusal)
            wire.close()
            continue
        except WireClosed as exc:
            log.warning("rendezvous_dropped", role="leader", peer=wire.peer, why=str(exc))
            wire.close()
            continue
        if member.host_index in joined:  # a follower that restarted: its old connection is stale
            joined.pop(member.host_index)[0].close()
        joined[member.host_index] = (wire, member, their_nonce)
        log.info("rendezvous_joined", role="leader", host_index=member.host_index, node=member.node,
                 peer=wire.peer, joined=len(joined) + 1, hosts=settings.hosts)
    return joined


def _leader_timed_out(settings: DistributedSection, missing: list[int], last_refusal: str) -> str:
    text = (f"[distributed] hosts {', '.join(map(str, missing))} did not join the group at {settings.leader} "
            f"within join_timeout = {settings.join_timeout:g}s")
    return text + (f"; the last one refused: {last_refusal}" if last_refusal else
                   "; is dsnode running there with this leader address, and can they reach this port?")


def _admit(wire: Wire, settings: DistributedSection, me: Member, keys: Sequence[bytes] | None
           ) -> tuple[Member, str]:
    """One follower's handshake: its Member and nonce, or RendezvousError (it was told why)."""
    nonce = random_tokens.token_hex(16)
    wire.send({"type": "challenge", "protocol": PROTOCOL, "nonce": nonce, "node": me.node,
               "auth": keys is not None})
    hello = wire.receive(HANDSHAKE_TIMEOUT_S)
    if hello is None:
        raise WireClosed(f"{wire.peer} sent no hello within {HANDSHAKE_TIMEOUT_S:g}s")
    try:
        member = Member(**{k: hello[k] for k in Member.__dataclass_fields__})
        their_nonce = str(hello["nonce"])
    except (KeyError, TypeError):
        protocol = hello.get("protocol")
        raise WireClosed(f"{wire.peer} sent a hello that is not dsnode's (protocol {protocol!r})") from None
    why = _credential_problem(hello, member, me, keys, nonce) or _mismatch(member, me, settings)
    if why:
        wire.send({"type": "refused", "why": why})
        raise RendezvousError(why)
    return member, their_nonce


def _credential_problem(hello: dict[str, Any], member: Member, me: Member, keys: Sequence[bytes] | None,
                        nonce: str) -> str | None:
    if keys is None:
        if hello.get("mac") is not None:
            return (f"{member.who()} signs with a cluster secret but {me.who()} has none: set the same "
                    "[auth] cluster_secret_file on every host of the group")
        return None
    if hello.get("mac") is None:
        return (f"{member.who()} has no cluster secret but {me.who()} has one: set the same "
                "[auth] cluster_secret_file on every host of the group")
    if not verify(keys, hello, nonce):
        return (f"{member.who()} does not hold {me.who()}'s cluster secret "
                "([auth] cluster_secret_file differs)")
    return None


def _mismatch(member: Member, me: Member, settings: DistributedSection) -> str | None:
    """The first difference that keeps this follower out of the group, both values named."""
    if not 1 <= member.host_index < settings.hosts:
        return (f"{member.node} says host_index = {member.host_index}, but {me.who()} has hosts = "
                f"{settings.hosts}: followers are 1..{settings.hosts - 1}")
    checks = (
        ("hosts", me.hosts, member.hosts),
        ("model", me.model, member.model),
        ("ranks_per_host", me.ranks_per_host, member.ranks_per_host),
        ("dtype", me.dtype, member.dtype),
        ("sha256 of the model's config.json", me.model_config_sha256[:12], member.model_config_sha256[:12]),
    )
    for what, mine, theirs in checks:
        if mine != theirs:
            return (f"{what} differs: {mine!r} on {me.who()}, {theirs!r} on {member.who()}; "
                    "every host of the group must serve the same model with the same [distributed] settings")
    return None


# --- a follower ---------------------------------------------------------------------------------------
def join(settings: DistributedSection, me: Member, keys: Sequence[bytes] | None) -> Formed:
    """Reach the leader and wait for `go`; raises RendezvousError when refused or on timeout."""
    started = time.monotonic()
    deadline, next_log, last_error = started + settings.join_timeout, started, "no attempt yet"
    while True:
        now = time.monotonic()
        if now >= deadline:
            raise RendezvousError(
                f"the leader's rendezvous at {settings.leader} did not answer within join_timeout = "
                f"{settings.join_timeout:g}s (last: {last_error}); is dsnode running on the leader "
                f"(host_index 0), and is TCP port {settings.rendezvous_port} open from this host?")
        if now >= next_log:
            log.info("rendezvous_waiting", role="follower", leader=settings.leader, host_index=me.host_index,
                     waited_s=round(now - started), timeout_s=settings.join_timeout, last=last_error)
            next_log = now + LOG_EVERY_S
        try:
            return _join_once(settings, me, keys, deadline)
        except (OSError, WireClosed) as exc:  # not there yet, or it restarted: try again
            last_error = str(exc) or type(exc).__name__
        time.sleep(min(RETRY_S, max(0.0, deadline - time.monotonic())))


def _join_once(settings: DistributedSection, me: Member, keys: Sequence[bytes] | None, deadline: float
               ) -> Formed:
    sock = socket.create_connection((settings.leader_host, settings.rendezvous_port),
                                    timeout=min(HANDSHAKE_TIMEOUT_S, max(0.1, deadline - time.monotonic())))
    wire = Wire(sock, settings.leader)
    try:
        challenge = wire.receive(HANDSHAKE_TIMEOUT_S)
        if challenge is None or challenge.get("type") != "challenge":
            raise WireClosed(f"{settings.leader} did not greet like a dsnode leader")
        nonce = random_tokens.token_hex(16)
        hello: dict[str, Any] = {"type": "hello", "protocol": PROTOCOL, "nonce": nonce, **asdict(me)}
        if keys:
            hello["mac"] = sign(keys[0], hello, str(challenge.get("nonce")))
        wire.send(hello)
        log.info("rendezvous_hello", role="follower", leader=settings.leader,
                 leader_node=challenge.get("node"))
        return Formed(_await_go(wire, settings, me, keys, nonce, deadline), {0: wire})
    except BaseException:
        wire.close()
        raise


def _await_go(wire: Wire, settings: DistributedSection, me: Member, keys: Sequence[bytes] | None, nonce: str,
              deadline: float) -> list[Member]:
    """The leader answers once every host has joined (or refuses at once)."""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RendezvousError(f"joined the leader at {settings.leader}, but the group did not form "
                                  f"within join_timeout = {settings.join_timeout:g}s (other hosts missing?)")
        reply = wire.receive(min(left, LOG_EVERY_S))
        if reply is None:
            log.info("rendezvous_waiting", role="follower", leader=settings.leader, detail="joined; waiting "
                     "for the other hosts")
            continue
        if reply.get("type") == "refused":
            raise RendezvousError(f"the leader at {settings.leader} refused this host: {reply.get('why')}")
        if reply.get("type") != "go":
            raise WireClosed(f"{settings.leader} sent {reply.get('type')!r}, not go")
        if keys and not verify(keys, reply, nonce):
            raise RendezvousError(f"the leader at {settings.leader} did not prove it holds this host's "
                                  "cluster secret ([auth] cluster_secret_file differs)")
        members = [Member(**m) for m in reply["members"]]
        log.info("group_formed", role="follower", host_index=me.host_index, hosts=settings.hosts,
                 world_size=settings.world_size, members=[m.node for m in members])
        return members


def _bind_problem(settings: DistributedSection, exc: OSError) -> str:
    """Why the leader cannot listen at its rendezvous address, in words."""
    if exc.errno == errno.EADDRNOTAVAIL:
        return (f"distributed.leader = {settings.leader!r}: this host (host_index 0, the leader) has no such "
                "address; is host_index right on this host?")
    if exc.errno == errno.EADDRINUSE:
        return (f"distributed.leader = {settings.leader!r}: port {settings.rendezvous_port} is in use "
                "on this host")
    return f"distributed.leader = {settings.leader!r}: cannot listen there: {exc.strerror or exc}"
