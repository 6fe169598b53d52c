"""The key and cluster-secret files: read once per (re)load, by one line reader, checked line by line.

`[auth] api_keys_file`: one key per line; `#` starts a comment.

    # name: key                      a named key: logs say `alice`
    alice: sk-live-4b1f0c6e9a2d47d8b3e5
    # name: sha256:<hex>             the same, stored hashed (printf %s KEY | sha256sum)
    ci: sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
    # a bare key, or a bare hash: logs say `sha256:9f86d081` (the first 8 hex digits of its hash)
    sk-live-0d5c2a7e91f34b66a8c1

`[auth] cluster_secret_file`: one secret per line; the first signs, every one verifies (rotation).

Problems name lines, never keys or secrets.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

MIN_KEY_CHARS = 16
MIN_SECRET_CHARS = 32
_NAME = r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}"
_NAMED = re.compile(rf"({_NAME}):\s+(\S+)")
_HASHED = re.compile(r"sha256:([0-9a-fA-F]{64})")


class SecretsFileError(Exception):
    """A key or secret file cannot be used; `problems` say why, never what a key is."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class KeyFileError(SecretsFileError):
    """The API key file cannot be used."""


class SecretFileError(SecretsFileError):
    """The cluster secret file cannot be used."""


def _lines(path: Path, error: type[SecretsFileError]) -> Iterator[tuple[int, str]]:
    """(line number, stripped line) of every line that is not blank or a `#` comment."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise error([f"cannot read: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError:
        raise error(["is not UTF-8 text"]) from None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if line and not line.startswith("#"):
            yield number, line


# --- API keys ---------------------------------------------------------------------------------------
def fingerprint(digest: bytes) -> str:
    """What logs show for an unnamed key: the first 8 hex digits of its SHA-256 (not reversible)."""
    return "sha256:" + digest.hex()[:8]


@dataclass(frozen=True)
class ApiKeys:
    by_digest: dict[bytes, str]  # SHA-256 of the key -> its name or fingerprint

    def identify(self, token: str) -> str | None:
        """The key's name (or fingerprint), or None when it is not a key of this node."""
        # Looked up by the token's SHA-256, never compared with a key: how long the lookup takes
        # depends only on hashes, and learning bits of a key's hash tells nothing about the key.
        return self.by_digest.get(hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest())

    def __len__(self) -> int:
        return len(self.by_digest)


def read_api_keys(path: Path) -> ApiKeys:
    """Parse the key file; raises KeyFileError listing every bad line."""
    keys: dict[bytes, str] = {}
    names: set[str] = set()
    problems: list[str] = []
    for number, line in _lines(path, KeyFileError):
        try:
            digest, name = _parse_line(line)
        except ValueError as exc:
            problems.append(f"line {number}: {exc}")
            continue
        if digest in keys:
            problems.append(f"line {number}: the same key is listed twice")
            continue
        if name is not None:
            if name in names:
                problems.append(f"line {number}: the name {name!r} is used twice")
                continue
            names.add(name)
        keys[digest] = name or fingerprint(digest)
    if not keys and not problems:
        problems.append("holds no key (every request would be refused)")
    if problems:
        raise KeyFileError(problems)
    return ApiKeys(keys)


def _parse_line(line: str) -> tuple[bytes, str | None]:
    named = _NAMED.fullmatch(line)
    name, secret = (named.group(1), named.group(2)) if named else (None, line)
    hashed = _HASHED.fullmatch(secret)
    if hashed:
        return bytes.fromhex(hashed.group(1)), name
    if secret.startswith("sha256:"):
        raise ValueError("a hashed key is sha256: and 64 hex digits")
    if any(c.isspace() for c in secret) or ":" in secret:
        raise ValueError("expected `KEY`, `sha256:HEX` or `NAME: KEY` (names: letters, digits and . _ @ -; "
                         "keys: no spaces or colons)")
    if len(secret) < MIN_KEY_CHARS:
        raise ValueError(f"a key needs at least {MIN_KEY_CHARS} characters "
                         f"(make one with `openssl rand -hex 24`)")
    return hashlib.sha256(secret.encode()).digest(), name


# --- the cluster secret -----------------------------------------------------------------------------
def read_cluster_secrets(path: Path) -> tuple[bytes, ...]:
    """The secrets in `path`, the signing one first; raises SecretFileError."""
    secrets: list[bytes] = []
    problems: list[str] = []
    for number, line in _lines(path, SecretFileError):
        if len(line) < MIN_SECRET_CHARS:
            problems.append(f"line {number}: a secret needs at least {MIN_SECRET_CHARS} characters "
                            f"(make one with `openssl rand -hex 32`)")
            continue
        secrets.append(line.encode())
    if not secrets and not problems:
        problems.append("holds no secret")
    if problems:
        raise SecretFileError(problems)
    return tuple(secrets)


# --- both, as one node uses them --------------------------------------------------------------------
@dataclass(frozen=True)
class Secrets:
    api_keys: ApiKeys | None = None  # None: no [auth] api_keys_file
    cluster: tuple[bytes, ...] | None = None  # None: no [auth] cluster_secret_file


def read_secrets(api_keys_file: Path | None, cluster_secret_file: Path | None) -> Secrets:
    """Both files (those named); raises KeyFileError / SecretFileError."""
    return Secrets(
        read_api_keys(api_keys_file) if api_keys_file else None,
        read_cluster_secrets(cluster_secret_file) if cluster_secret_file else None,
    )
