"""`/etc/dsnode/dsnode.toml`, parsed and validated once into immutable objects.

Every problem is reported as `file: key: why (got value)`; `load_config` collects all of them before
raising, so an operator fixes a file in one pass. Nothing else in dsnode reads the file or the
environment for settings. Relative paths are relative to the config file's folder.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from .config_problems import ConfigError, Problem, problem_of
from .debug import DebugSection
from .distributed import DistributedSection, cross_section_problems
from .secrets import KeyFileError, SecretFileError, Secrets, read_api_keys, read_cluster_secrets, read_secrets
from .store.layout import DEFAULT_ROOT as DEFAULT_STORE_ROOT
from .store.refs import resolve_model_path
from .versions import CanarySection, Label, ModelVersion, SplitTable, split_problems

DEFAULT_CONFIG_PATH = Path("/etc/dsnode/dsnode.toml")
MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@-]{0,127}$")


class _Section(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


def _as_path(value: Any) -> Any:
    """TOML has no path type: accept a non-empty string for Path fields (strict mode would not)."""
    if isinstance(value, str):
        if not value:
            raise ValueError("must not be empty")
        return Path(value)
    return value


PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]


def parse_listen(value: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' → (host, port); raises ValueError with the reason."""
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^:\[\]\s]+):(\d+)", value)
    if not match:
        raise ValueError("must be HOST:PORT, e.g. 0.0.0.0:8000 or [::]:8000")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if not 0 <= port <= 65535:
        raise ValueError("port must be between 0 and 65535")
    if match.group(1):
        ipaddress.IPv6Address(host)
    return host, port


def check_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https"):
        raise ValueError("must start with http:// or https://")
    if not parts.hostname:
        raise ValueError("has no host")
    try:
        port = parts.port
    except ValueError:
        raise ValueError("has an invalid port") from None
    if port == 0:
        raise ValueError("has an invalid port")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError("must be the node's base URL, without a path (e.g. http://10.0.0.5:8000)")
    return value.rstrip("/")


class NodeSection(_Section):
    name: str = Field(default_factory=socket.gethostname, min_length=1, max_length=128)
    role: Literal["edge", "central"]
    listen: str = "0.0.0.0:8000"
    advertise_url: str | None = None  # how peers reach this node, if not derivable from `listen`
    drain_timeout: PositiveFloat = 30.0  # seconds in-flight requests get to finish on stop
    idle_timeout: PositiveFloat = 75.0  # seconds a connection may sit idle or take to send a request head
    watchdog: bool = True  # send WATCHDOG=1 when systemd asks for it

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        parse_listen(value)
        return value

    @field_validator("advertise_url")
    @classmethod
    def _advertise(cls, value: str | None) -> str | None:
        return None if value is None else check_url(value)

    @property
    def host(self) -> str:
        return parse_listen(self.listen)[0]

    @property
    def port(self) -> int:
        return parse_listen(self.listen)[1]


class ModelSection(_Section):
    name: str
    path: Path
    backend: Literal["onnx", "deepspeed", "transformers"]
    max_context: PositiveInt | None = None  # default: the model's own limit
    quantization: Literal["none", "int8", "nf4"] = "none"  # central bitsandbytes; ONNX reads its manifest
    tensor_parallel: PositiveInt | None = None  # deepspeed: default all local GPUs (1 on CPU)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    threads: PositiveInt | None = None  # CPU threads for inference (default: all cores)
    # "deepseek_r1": the model thinks in <think>…</think>, answered as reasoning_content; "auto": so
    # when the chat template mentions </think> (R1 and its distills, the bundled models)
    reasoning: Literal["auto", "deepseek_r1", "none"] = "auto"
    label: Label | None = None  # the served version's name of your own (dsnode.versions)
    switch: Literal["auto", "beside", "drain"] = "auto"  # how a reload onto another version loads it

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not MODEL_NAME_RE.match(value):
            raise ValueError("must be 1-128 characters: letters, digits and . _ : / @ -")
        return value

    _path = field_validator("path", mode="before")(lambda cls, v: _as_path(v))


class BatchingSection(_Section):
    max_batch_tokens: PositiveInt = 32768  # KV tokens the running batch may hold
    max_running: PositiveInt = 64  # sequences decoded together
    max_queue: PositiveInt = 256  # requests waiting for a batch slot before 429
    prefill_chunk_tokens: PositiveInt = 2048  # prompt tokens prefilled per step
    # host memory for the KV cache of finished prompts, reused by later prompts that begin alike (onnx on
    # CPU, transformers, deepspeed: per rank); 0: off
    prompt_cache_mb: Annotated[int, Field(ge=0)] = 1024


class UpstreamSection(_Section):
    url: str
    weight: PositiveInt = 1
    max_fails: Annotated[int, Field(ge=0)] | None = None  # nginx's meaning; default from [routing]
    fail_timeout: PositiveFloat | None = None  # seconds

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return check_url(value)


class RoutingSection(_Section):
    long_prompt_tokens: PositiveInt = 2048
    max_fails: Annotated[int, Field(ge=0)] = 1  # failures within fail_timeout that mark a peer down
    fail_timeout: PositiveFloat = 10.0  # seconds
    poll_interval: PositiveFloat = 2.0  # seconds between advertisement polls
    poll_timeout: PositiveFloat = 2.0
    connect_timeout: PositiveFloat = 2.0
    first_token_timeout: PositiveFloat = 120.0  # forwarded: until the upstream answers headers
    max_answer_bytes: PositiveInt = 16 * 1024 * 1024  # a whole (non-streamed) upstream answer; then 502
    max_event_bytes: PositiveInt = 1024 * 1024  # one SSE event of a streamed upstream answer; then cut
    # "prefix": requests whose prompts begin alike (a conversation's turns) go to the same upstream while
    # it can take them, so its prompt cache holds them; "none": smooth weighted round-robin for all
    affinity: Literal["none", "prefix"] = "none"
    upstream: tuple[UpstreamSection, ...] = ()
    split: SplitTable = Field(default_factory=dict)  # model → version → percent (dsnode.versions)
    canary: CanarySection = Field(default_factory=CanarySection)

    @field_validator("upstream", mode="before")
    @classmethod
    def _list(cls, value: Any) -> Any:
        return tuple(value) if isinstance(value, list) else value

    @model_validator(mode="after")
    def _unique_upstreams(self) -> "RoutingSection":
        urls = [u.url for u in self.upstream]
        dupes = sorted({u for u in urls if urls.count(u) > 1})
        if dupes:
            raise ValueError(f"upstream urls must be unique; repeated: {', '.join(dupes)}")
        return self


class AuthSection(_Section):
    api_keys_file: Path | None = None  # one key per line, or sha256:<hex>; `name: key` labels it
    cluster_secret_file: Path | None = None  # shared by every node of the cluster
    max_clock_skew: PositiveFloat = 30.0  # seconds a peer credential is good for, either side

    _paths = field_validator("api_keys_file", "cluster_secret_file", mode="before")(lambda cls, v: _as_path(v))


class LimitsSection(_Section):
    max_body_bytes: PositiveInt = 8 * 1024 * 1024
    max_prompt_tokens: PositiveInt | None = None
    max_tokens: PositiveInt | None = None  # cap on a request's max_tokens
    max_messages: PositiveInt = 1024
    max_concurrent_per_key: PositiveInt | None = None  # per API key (needs [auth] api_keys_file)
    body_timeout: PositiveFloat = 60.0  # seconds a client may take to send a request body
    stored_responses_mb: Annotated[int, Field(ge=0)] = 64  # /v1/responses kept for previous_response_id; 0: none


class TlsSection(_Section):
    cert_file: Path | None = None  # serve HTTPS when set (with key_file)
    key_file: Path | None = None
    ca_file: Path | None = None  # trust for https:// upstreams (default: system store)

    _paths = field_validator("cert_file", "key_file", "ca_file", mode="before")(lambda cls, v: _as_path(v))

    @model_validator(mode="after")
    def _pair(self) -> "TlsSection":
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file must be given together")
        return self


class StoreSection(_Section):
    root: Path = DEFAULT_STORE_ROOT  # where `dsnode models pull` puts NAME/VERSION folders

    _root = field_validator("root", mode="before")(lambda cls, v: _as_path(v))


class LoggingSection(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console", "journal"] = "auto"


class Config(_Section):
    node: NodeSection
    model: ModelSection
    batching: BatchingSection = Field(default_factory=BatchingSection)
    routing: RoutingSection = Field(default_factory=RoutingSection)
    auth: AuthSection = Field(default_factory=AuthSection)
    limits: LimitsSection = Field(default_factory=LimitsSection)
    tls: TlsSection = Field(default_factory=TlsSection)
    logging: LoggingSection = Field(default_factory=LoggingSection)
    store: StoreSection = Field(default_factory=StoreSection)
    distributed: DistributedSection | None = None  # one model over several hosts (dsnode.distributed)
    debug: DebugSection = Field(default_factory=DebugSection)  # testing dsnode itself (dsnode.debug)
    source: Path | None = None  # the file it came from (set by load_config)
    model_version: ModelVersion | None = None  # when [model] path names a store version (set by load_config)
    _secrets: Secrets | None = PrivateAttr(default=None)  # the [auth] files as load_config read them

    def secrets(self) -> Secrets:
        """The `[auth]` key and secret files: as `load_config` read them, or read now (a config built
        in code, or loaded without its paths checked). Raises KeyFileError / SecretFileError."""
        if self._secrets is not None:
            return self._secrets
        return read_secrets(self.auth.api_keys_file, self.auth.cluster_secret_file)

    def redacted(self) -> dict[str, Any]:
        """The effective configuration for the start-up log: paths to secrets, never secrets."""
        return self.model_dump(mode="json")


def load_config(path: Path | str, check_paths: bool = True) -> Config:
    """Read, parse and validate; raises ConfigError listing every problem.

    `check_paths=False` skips the checks that need this host's files (model folder, key files), to
    validate a config written for another machine."""
    path = Path(path)
    raw = _read_toml(path)
    version, why = resolve_model_path(raw, path.resolve().parent)  # NAME / NAME@VERSION → its folder
    problems = [Problem(str(path), "model.path", why)] if why and check_paths else []
    _resolve_paths(raw, path.resolve().parent)
    read: dict[str, Any] = {}
    problems += _check_files(raw, str(path), read, model=not problems) if check_paths else []
    problems += [Problem(str(path), key, why) for key, why in cross_section_problems(raw) + split_problems(raw)]
    try:
        config = Config.model_validate({**raw, "source": path, "model_version": version})
    except ValidationError as exc:
        problems = [problem_of(path, err) for err in exc.errors()] + problems
        raise ConfigError(problems) from None
    if problems:
        raise ConfigError(problems)
    if check_paths:
        config._secrets = Secrets(read.get("api_keys"), read.get("cluster"))
    return config


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([Problem(str(path), "(file)", f"cannot read: {exc.strerror or exc}")]) from None
    except UnicodeDecodeError:
        raise ConfigError([Problem(str(path), "(file)", "is not UTF-8 text")]) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([Problem(str(path), "(syntax)", f"invalid TOML: {exc}")]) from None
    for key in ("source", "model_version"):
        if key in data:
            raise ConfigError([Problem(str(path), key, "unknown key")])
    return data


_PATH_KEYS = {
    "model": ("path",),
    "auth": ("api_keys_file", "cluster_secret_file"),
    "tls": ("cert_file", "key_file", "ca_file"),
}


def _resolve_paths(raw: dict[str, Any], base: Path) -> None:
    for section, keys in _PATH_KEYS.items():
        table = raw.get(section)
        if not isinstance(table, dict):
            continue
        for key in keys:
            value = table.get(key)
            if isinstance(value, str) and value and not Path(value).is_absolute():
                table[key] = str(base / value)


def _check_files(raw: dict[str, Any], file: str, read: dict[str, Any], model: bool) -> list[Problem]:
    """Checks that need the file system (on the raw tables, so they run even when others fail);
    `model=False`: the model folder was already found wanting."""
    problems: list[Problem] = []
    model_table = raw.get("model") if isinstance(raw.get("model"), dict) else {}
    model_dir, backend = model_table.get("path"), model_table.get("backend")
    if model and isinstance(model_dir, str) and model_dir:
        problems += _check_model_dir(Path(model_dir), backend, file)
    for section, keys in _PATH_KEYS.items():
        table = raw.get(section)
        if section == "model" or not isinstance(table, dict):
            continue
        for key in keys:
            value = table.get(key)
            if isinstance(value, str) and value and not Path(value).is_file():
                problems.append(Problem(file, f"{section}.{key}", f"no such file (got {value!r})"))
    auth = raw.get("auth")
    if isinstance(auth, dict):
        problems += _check_secret_files(auth, file, read)
    quantization = model_table.get("quantization", "none")
    if backend == "onnx" and quantization != "none":
        problems.append(
            Problem(
                file,
                "model.quantization",
                "applies to the deepspeed/transformers backends; an ONNX model's quantization is "
                f"fixed by dsnode convert (got {quantization!r})",
            )
        )
    return problems


def _check_secret_files(auth: dict[str, Any], file: str, read: dict[str, Any]) -> list[Problem]:
    """Every bad line of the key and secret files (by line number: never a key in a message). What
    reads well goes into `read`, so the files are parsed once per load."""
    problems: list[Problem] = []
    keys, secret = auth.get("api_keys_file"), auth.get("cluster_secret_file")
    if isinstance(keys, str) and keys and Path(keys).is_file():
        try:
            read["api_keys"] = read_api_keys(Path(keys))
        except KeyFileError as exc:
            problems += [Problem(file, "auth.api_keys_file", f"{keys}: {why}") for why in exc.problems]
    if isinstance(secret, str) and secret and Path(secret).is_file():
        try:
            read["cluster"] = read_cluster_secrets(Path(secret))
        except SecretFileError as exc:
            key = "auth.cluster_secret_file"
            problems += [Problem(file, key, f"{secret}: {why}") for why in exc.problems]
    return problems


def _check_model_dir(model_dir: Path, backend: Any, file: str) -> list[Problem]:
    if not model_dir.is_dir():
        return [Problem(file, "model.path", f"no such model folder (got {str(model_dir)!r})")]
    if backend == "onnx":
        marker, kind = "manifest.json", "a converted ONNX model (see dsnode convert)"
    else:
        marker, kind = "config.json", "a Hugging Face model folder"
    if not (model_dir / marker).is_file():
        return [Problem(file, "model.path", f"is not {kind}: no {marker} (got {str(model_dir)!r})")]
    return []
