"""`dsnode canary status|promote|rollback|reset`: the splits of a node and an operator's decisions on
them (`GET /canary`, `POST /canary/ACTION`; docs/versions.md). Ask the node that shares the traffic
(the one clients send to: an edge).

    dsnode canary status   [--url URL] [--json]
    dsnode canary promote  MODEL [VERSION]   the version gets 100% (VERSION: the split's only canary)
    dsnode canary rollback MODEL [VERSION]   its share goes to the baseline, until reset or a reload
    dsnode canary reset    MODEL             the configured shares again, fresh windows

Exit codes: 0 done; 1 the node could not be reached, or refused (the message says why).
"""

from __future__ import annotations

import argparse
import json
import ssl
import sys
import urllib.error
import urllib.request
from typing import Any

from .splits_view import format_splits
from .status import Unreachable, add_node_options, api_key_headers, peer_signer

EXIT_OK, EXIT_FAILED = 0, 1
ACTIONS = {
    "status": "the splits: shares configured and in force, each version's figures, decisions",
    "promote": "give a version of a split 100% of its model's requests",
    "rollback": "give a canary's share to the baseline (until reset, or a reload changes the split)",
    "reset": "the configured shares again, with fresh windows",
}


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser("canary", help="model versions sharing a model's requests: status, promote, rollback")
    actions = p.add_subparsers(dest="canary_action", required=True, metavar="ACTION")
    for action, help_text in ACTIONS.items():
        q = actions.add_parser(action, help=help_text)
        if action != "status":
            q.add_argument("model", metavar="MODEL")
        if action in ("promote", "rollback"):
            q.add_argument("version", metavar="VERSION", nargs="?", help="a version id or label (default: the canary)")
        add_node_options(q, url_help="the node that splits the traffic", json_help="print the node's JSON answer",
                         timeout=10.0, secret_help="needed when the node has one")
        q.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    url, action = args.url.rstrip("/"), args.canary_action
    body = None if action == "status" else {"model": args.model, "version": getattr(args, "version", None)}
    path = "/canary" if action == "status" else f"/canary/{action}"
    try:
        answer = call(url, path, body, args)
    except Unreachable as exc:
        print(f"dsnode canary {action}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(json.dumps(answer, indent=2))
        return EXIT_OK
    decision = answer.get("decision")
    if isinstance(decision, dict):
        print(f"{decision.get('model')} {decision.get('version')}: {str(decision.get('action')).replace('_', ' ')}")
    elif action == "reset":
        print(f"{args.model}: the configured shares again")
    splits = answer.get("splits") or ([answer["split"]] if isinstance(answer.get("split"), dict) else [])
    print(format_splits(splits) if splits else "no splits on this node ([routing.split] in its config)")
    return EXIT_OK


def call(url: str, path: str, body: dict[str, Any] | None, args: argparse.Namespace) -> dict[str, Any]:
    """The node's JSON answer; raises Unreachable with the reason (its error message, on a refusal)."""
    method = "GET" if body is None else "POST"
    signer = peer_signer(getattr(args, "secret_file", None), method, path, "dsnode-canary")
    headers = {} if signer else api_key_headers(getattr(args, "api_key_file", None))
    ca_file = getattr(args, "ca_file", None)
    context = ssl.create_default_context(cafile=str(ca_file)) if ca_file is not None else None
    to = None
    for _ in range(2):  # a credential made for no node yet is challenged: sign for the one named
        sent = {**headers, **(signer(to) if signer else {})}
        try:
            return _send(url, path, method, body, sent, args.timeout, context)
        except urllib.error.HTTPError as exc:
            challenge = _challenge(exc)
            if exc.code != 401 or signer is None or challenge is None or challenge == to:
                raise Unreachable(_refusal(url, path, exc)) from None
            to = challenge
    raise Unreachable(f"{url}{path} refused the cluster credential made for it: is the cluster secret the same?")


def _send(url: str, path: str, method: str, body: dict[str, Any] | None, headers: dict[str, str],
          timeout: float, context: ssl.SSLContext | None) -> dict[str, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{url}{path}", data=data, method=method,
                                     headers={**headers, **({"Content-Type": "application/json"} if data else {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            answer = json.loads(response.read())
    except urllib.error.HTTPError:
        raise
    except (urllib.error.URLError, OSError) as exc:
        raise Unreachable(f"cannot reach {url} ({getattr(exc, 'reason', exc)}). Is dsnode running there?") from None
    except ValueError:
        raise Unreachable(f"{url}{path} did not answer JSON: is that a dsnode node?") from None
    if not isinstance(answer, dict):
        raise Unreachable(f"{url}{path} did not answer like a dsnode node")
    return answer


def _challenge(exc: urllib.error.HTTPError) -> Any:
    from ..cluster.peer_auth import challenge_of
    from ..headers import PEER_CHALLENGE

    return challenge_of(exc.headers.get(PEER_CHALLENGE))


def _refusal(url: str, path: str, exc: urllib.error.HTTPError) -> str:
    try:
        message = json.loads(exc.read())["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = exc.reason
    if exc.code == 404 and path == "/canary":
        message = "no /canary there (a dsnode from before model versions?)"
    return f"{url}{path} answered HTTP {exc.code}: {message}"


# --- dsnode check-config --cluster URL ----------------------------------------------------------------
def cluster_split_problems(url: str, split: dict[str, dict[str, int]], timeout: float = 10.0) -> list[tuple[str, str]]:
    """(key, why) for each model and version of `split` that no node serves, as the node at `url`
    sees the cluster (itself and its upstreams' advertisements); raises Unreachable."""
    from ..cluster.splits import cluster_problems
    from ..versions import ServedVersion
    from .status import fetch_cluster

    cluster = fetch_cluster(url.rstrip("/"), timeout)
    adverts = [cluster["node"], *(p.get("advert") for p in cluster.get("peers") or [] if isinstance(p, dict))]
    served: dict[str, list[ServedVersion]] = {}
    for advert in adverts:
        for model in (advert or {}).get("models") or []:
            if isinstance(model, dict) and isinstance(model.get("name"), str):
                versions = served.setdefault(model["name"], [])
                if isinstance(model.get("version"), str):
                    label = model.get("version_label")
                    versions.append(ServedVersion(model["version"], label if isinstance(label, str) else None))
    return [(key, why) for _, key, why in cluster_problems(split, served)]
