"""TLS and authenticated peers between real `dsnode serve` processes.

A central listens on HTTPS (`[tls] cert_file`/`key_file`, a certificate from a CA made here with
`openssl`) and asks for API keys and the cluster secret; an edge (plain HTTP to its clients) forwards
to it over `https://`, verifying it against `[tls] ca_file`, signing each request with the shared
secret and sending the client's key *name*, not the key. A wrong CA, a wrong secret or a forged
forward is refused; `dsnode status` authenticates with the secret; no key or secret reaches a log.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest
from dsnode.cli import main
from dsnode.cluster.pool import ConnectFailed, Origin, Pool

from tests.support.nodes import ServeProcess, free_port, node_toml

pytestmark = pytest.mark.slow

ALICE = "sk-alice-tls-0123456789abcdef"
SECRET = "tls-cluster-secret-" + "7" * 40
WRONG_SECRET = "tls-cluster-secret-" + "8" * 40
CENTRAL_MODEL, EDGE_MODEL = "tiny-central", "tiny-edge"
WAIT_S = 120.0


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(folder: Path, name: str) -> None:
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN=dsnode test {name}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=folder)


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("certs")
    make_ca(folder, "ca")
    make_ca(folder, "rogue")
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", "node.key", "-out", "node.csr", "-subj", "/CN=127.0.0.1", cwd=folder)
    (folder / "node.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
                                     "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n")
    openssl("x509", "-req", "-in", "node.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "node.pem", "-days", "2", "-extfile", "node.ext", cwd=folder)
    return {"ca": folder / "ca.pem", "rogue": folder / "rogue.pem", "cert": folder / "node.pem",
            "key": folder / "node.key"}


def https_get(url: str, ca: Path | None, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    context = ssl.create_default_context(cafile=str(ca)) if ca else ssl.create_default_context()
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait(check, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError, KeyError, IndexError):
            if check():
                return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def nodes(tmp_path_factory, dense_dir, certs):
    work = tmp_path_factory.mktemp("tls")
    (work / "keys").write_text(f"alice: {ALICE}\n")
    (work / "secret").write_text(SECRET + "\n")
    (work / "edge-secret").write_text(SECRET + "\n")
    central_port, edge_port = free_port(), free_port()
    auth = '[auth]\napi_keys_file = "keys"\ncluster_secret_file = "{secret}"\n'
    central_cfg = work / "central.toml"
    tls = f'\n[tls]\ncert_file = "{certs["cert"]}"\nkey_file = "{certs["key"]}"\n'
    central_cfg.write_text(node_toml("central-tls", "central", central_port, CENTRAL_MODEL, dense_dir,
                                     "transformers", extra=auth.format(secret="secret") + tls))
    edge_cfg = work / "edge.toml"
    edge_cfg.write_text(node_toml("edge-tls", "edge", edge_port, EDGE_MODEL, dense_dir, "transformers",
                                  extra=auth.format(secret="edge-secret") + f"""
[tls]
ca_file = "{certs["ca"]}"

[routing]
poll_interval = 0.3
max_fails = 0

[[routing.upstream]]
url = "https://127.0.0.1:{central_port}"
"""))
    central = ServeProcess("central-tls", central_cfg, central_port, work / "central.log").start()
    edge = ServeProcess("edge-tls", edge_cfg, edge_port, work / "edge.log").start()
    central.url_tls = f"https://127.0.0.1:{central_port}"  # type: ignore[attr-defined]
    try:
        wait(lambda: https_get(central.url_tls + "/ready", certs["ca"])[0] == 200, "the central (HTTPS)")
        edge.wait_ready(timeout=WAIT_S)
        wait(lambda: peer_state(edge)["healthy"], "the edge to see the central")
        yield {"central": central, "edge": edge, "work": work}
    finally:
        codes = (edge.stop(), central.stop())
    assert codes == (0, 0), edge.log_tail() + central.log_tail()


def peer_state(edge: ServeProcess) -> dict:
    request = urllib.request.Request(edge.url + "/cluster", headers={"Authorization": f"Bearer {ALICE}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())["peers"][0]


def sdk(edge: ServeProcess, key: str = ALICE) -> openai.OpenAI:
    return openai.OpenAI(base_url=edge.url + "/v1", api_key=key, max_retries=0, timeout=60)


# --- the tests, in order --------------------------------------------------------------------------
def test_the_listener_speaks_tls_verified_against_its_ca(nodes, certs):
    url = nodes["central"].url_tls
    assert https_get(url + "/health", certs["ca"]) == (200, b'{"status": "ok"}')
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        https_get(url + "/health", certs["rogue"])
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):  # plain HTTP: no answer, no hang
        urllib.request.urlopen(nodes["central"].url + "/health", timeout=10).read()


def test_an_edge_forwards_over_verified_tls_signed_with_the_secret_and_no_client_key(nodes):
    response = sdk(nodes["edge"]).completions.with_raw_response.create(
        model=CENTRAL_MODEL, prompt="Hello", max_tokens=3, temperature=0,  # greedy: 3 tokens, never fewer
        extra_headers={"X-Request-Id": "tls-1"})
    route, served_by = response.headers["x-dsnode-route"], response.headers["x-dsnode-node"]
    assert (route, served_by) == ("forwarded", "central-tls")
    assert response.parse().usage.completion_tokens == 3
    # each node logs a request once its answer is sent: after the client has it
    wait(lambda: all("tls-1" in nodes[n].request_records() for n in ("central", "edge")), "both nodes' records")
    central, edge = nodes["central"].request_records()["tls-1"], nodes["edge"].request_records()["tls-1"]
    assert central["user"] == "alice" == edge["user"]  # by name: the central never saw the key
    assert edge["upstream"] == nodes["central"].url_tls
    with pytest.raises(openai.AuthenticationError):
        sdk(nodes["edge"], "sk-not-a-key-of-this-cluster").models.list()


async def test_the_pool_refuses_a_peer_its_ca_did_not_sign(nodes, certs):
    origin = Origin.from_url(nodes["central"].url_tls)
    request = b"GET /health HTTP/1.1\r\nHost: " + origin.host_header + b"\r\n\r\n"
    rogue = Pool(ssl.create_default_context(cafile=str(certs["rogue"])))
    with pytest.raises(ConnectFailed, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
        await rogue.request(origin, request, 5.0, 5.0)
    trusted = Pool(ssl.create_default_context(cafile=str(certs["ca"])))
    response = await trusted.request(origin, request, 5.0, 5.0)
    assert response.status == 200 and await response.read(5.0) == b'{"status": "ok"}'
    response.release()
    await asyncio.gather(rogue.close(), trusted.close())


def test_a_forged_forward_and_a_peer_with_the_wrong_secret_are_refused(nodes, certs):
    central, edge = nodes["central"], nodes["edge"]
    status, body = https_get(central.url_tls + "/cluster", certs["ca"], {"X-DSNode-Via": "edge-tls"})
    assert status == 401 and json.loads(body)["error"]["code"] == "invalid_peer_credential"
    status, body = https_get(central.url_tls + "/v1/models", certs["ca"],
                             {"Authorization": f"Bearer {ALICE}", "X-DSNode-User": "root"})
    assert status == 401 and json.loads(body)["error"]["code"] == "invalid_peer_credential"

    secret_file = nodes["work"] / "edge-secret"
    secret_file.write_text(WRONG_SECRET + "\n")  # this edge no longer shares the cluster's secret
    edge.signal(signal.SIGHUP)
    wait(lambda: not peer_state(edge)["healthy"], "the central to refuse the edge's polls")
    assert "HTTP 401: the peer refused this node's cluster credential" in peer_state(edge)["last_error"]
    with pytest.raises(openai.APIStatusError) as refused:
        sdk(edge).completions.create(model=CENTRAL_MODEL, prompt="Hello", max_tokens=2)
    assert refused.value.status_code == 503 and "HTTP 401" in refused.value.message

    secret_file.write_text(f"{SECRET}\n{WRONG_SECRET}\n")  # back in the cluster (rotation: first one signs)
    edge.signal(signal.SIGHUP)
    wait(lambda: peer_state(edge)["healthy"], "the edge to be let in again")
    answer = sdk(edge).completions.create(model=CENTRAL_MODEL, prompt="Hello", max_tokens=2, temperature=0)
    assert answer.usage.completion_tokens == 2


def status(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["status", *args])
    return code, out.getvalue(), err.getvalue()


def test_dsnode_status_authenticates_with_the_secret_or_a_key(nodes, certs):
    url = nodes["central"].url_tls
    code, _, err = status("--url", url, "--ca-file", str(certs["ca"]))
    assert code == 1 and "HTTP 401" in err and "--secret-file" in err
    code, out, _ = status("--url", url, "--ca-file", str(certs["ca"]), "--secret-file",
                          str(nodes["work"] / "secret"), "--json")
    assert code == 0 and json.loads(out)["nodes"][0]["node"] == "central-tls"
    key_file = nodes["work"] / "alice.key"
    key_file.write_text(ALICE + "\n")
    code, out, _ = status("--url", nodes["edge"].url, "--api-key-file", str(key_file))
    assert code == 0 and "edge-tls" in out and "central-tls" in out


def test_no_key_or_secret_reaches_a_log(nodes):
    for node in (nodes["central"], nodes["edge"]):
        text = node.log_text()
        assert '"event": "request"' in text
        for secret in (ALICE, SECRET, WRONG_SECRET, SECRET[-20:]):
            assert secret not in text, node.name
