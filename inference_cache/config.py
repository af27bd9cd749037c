"""Configuration of ``inference-cache serve``: frozen settings, strict YAML, fix-it errors.

Owner: the server's composition root (``inference_cache.extproc.serve``). Data flow:
``--config FILE`` (YAML) + ``INFERENCE_CACHE_*`` environment + command-line flags are merged
here into one immutable :class:`Config`; ``serve`` validates it once and builds the server
from it. Nothing else reads the environment or the file.

File layout (every key optional except where noted)::

    server:                     # one key per serve flag: --grpc-bind-address -> grpc_bind_address
      grpc_bind_address: ":9090"
      allowed_producer_sa: [system:serviceaccount:ns:subscriber]
    health_interval_s: 2.0
    models:
      - name: demo-model        # required, unique
        block_size: 16          # tokens per KV block (the engine's --block-size)
        tokenizer: /models/qwen      # local dir with tokenizer.json (+ tokenizer_config.json)
        chat_template: null          # a .jinja file overriding the tokenizer config's template
        matching: auto               # auto | tokens | bytes | approximate (docs/configuration.md)
        lora_adapters: [{name: sql-lora, id: 1}]
    endpoints:
      - address: 10.0.0.7:8000  # required: the replica id (what the gateway routes to)
        model: demo-model       # required: a models[].name
        tenant: ""              # all endpoints of one model share one tenant
        kv_events: tcp://10.0.0.7:5557   # the engine's ZMQ PUB endpoint (null: no events;
                                         # the model is then matched approximately)
        kv_events_bind: false   # bind instead of connect (the engine connects to us)
        replay: tcp://10.0.0.7:5558      # the engine's replay ROUTER endpoint
        topic: ""               # ZMQ subscription prefix ("" = every topic)
        metrics_url: http://10.0.0.7:8000/metrics
    templates:                  # PromptTemplates outside Kubernetes (docs/templates.md)
      - namespace: team-a       # required: usable from this tenant (and spec.allowedNamespaces)
        name: support           # required: requests name it team-a/support
        spec: {body: "...", slots: [...]}   # a PromptTemplate spec, decoded strictly
    warmup:                     # pre-fill each template's stable prefix (extproc/warmup.py)
      enabled: false            # off by default
      replicas: 1               # replicas per model, the picker's top choices
      max_concurrency: 4        # warm-up requests in flight at once
      timeout_s: 30.0           # per warm-up request
    discovery:                  # endpoints[] from CacheBackends + pods (extproc/discovery.py)
      enabled: false            # in-cluster only: polls the API with the pod's ServiceAccount
      interval_s: 10.0          # seconds between polls
      namespace: ""             # "" = all namespaces

Precedence for ``server`` settings: flag > environment (``INFERENCE_CACHE_<KEY>`` upper case)
> file > default. Decoding is strict: an unknown key or a wrongly typed value is an error that
names the key path (``endpoints[1].modle: unknown key; expected one of ...``).
"""

from __future__ import annotations

import ipaddress
import os
import types
import typing
import urllib.parse
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import yaml

from inference_cache.extproc import templates as templates_mod
from inference_cache.extproc.openai import Limits
from inference_cache.extproc.scoring import ScoringSettings

ENV_PREFIX = "INFERENCE_CACHE_"


class ConfigError(ValueError):
    """An invalid configuration; the message says where and how to fix it."""


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """The ``serve`` flags, one field per flag (``--a-b`` is ``a_b``)."""

    #: gRPC listener (``:port`` = all interfaces).
    grpc_bind_address: str = ":9090"
    #: Public HTTP: ``/healthz``, ``/readyz``, ``/metrics``.
    http_bind_address: str = ":8080"
    #: Controller-only HTTP: ``/snapshot``, ``/policy``, ``/templates``.
    snapshot_bind_address: str = ":8081"
    #: The only ServiceAccount allowed on the controller listener.
    allowed_controller_sa: str = ""
    #: Development escape hatch: no auth on the controller listener.
    insecure_disable_auth: bool = False
    #: TokenReview audience for controller tokens.
    controller_audience: str = "inferencecache.io/controller"
    tls_cert_file: str = ""
    tls_key_file: str = ""
    #: ``json`` or ``text``.
    log_format: str = "json"
    #: ``debug``, ``info``, ``warn``/``warning`` or ``error``.
    log_level: str = "info"
    #: When set, ReportCacheState and PublishEvent are served only on this listener.
    producer_bind_address: str = ""
    #: When non-empty, the write RPCs require a bearer token of one of these ServiceAccounts.
    allowed_producer_sa: tuple[str, ...] = ()
    #: TokenReview audience for producer tokens.
    producer_audience: str = "inferencecache.io/producer"
    #: Envoy ext_proc listener (the endpoint picker; ``:port`` = all interfaces).
    extproc_bind_address: str = ":9002"
    #: ``auto`` (Envoy's ``protocol_config``, else buffered), ``buffered`` or ``full-duplex``.
    extproc_body_mode: str = "auto"
    #: ``cache-aware`` (predicted time to first token) or ``round-robin`` (a baseline with
    #: the same ext_proc work, for comparisons).
    routing: str = "cache-aware"
    #: Ordered fallback endpoints after the primary in the destination (0 = primary only).
    fallback_endpoints: int = 0
    #: Trust the request header ``x-inference-cache-tenant`` for the tenant's policy.
    tenant_header: bool = False
    #: Add ``x-inference-cache-decision`` to responses (reveals cache state: debugging only).
    debug_decision_header: bool = False

    @classmethod
    def loopback(cls, **overrides: Any) -> ServerSettings:
        """Every listener on an ephemeral 127.0.0.1 port, no controller auth: what the demo,
        the benchmarks and the tests run in-process."""
        binds = {f"{name}_bind_address": "127.0.0.1:0" for name in ("grpc", "http", "snapshot", "extproc")}
        return cls(**{**binds, "insecure_disable_auth": True, **overrides})

    def file_section(self) -> dict[str, Any]:
        """This as the ``server:`` mapping of a ``serve --config`` file (what ``parse``
        reads back into an equal object)."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}


@dataclass(frozen=True, slots=True)
class LoraAdapter:
    #: The adapter name: the ``adapter`` of index scopes and ``adapter_id`` on the wire.
    name: str
    #: The engine's integer LoRA id (what vLLM KV events carry).
    id: int


#: ``models[].matching`` values (``auto``: bytes where they can be used, else tokens).
MATCHING_MODES = ("auto", "tokens", "bytes", "approximate")


@dataclass(frozen=True, slots=True)
class ModelConfig:
    name: str
    #: Tokens per KV block; must equal the engine's ``--block-size``.
    block_size: int = 16
    #: Local directory with ``tokenizer.json`` (+ ``tokenizer_config.json``), or the file:
    #: precise matching tokenizes requests with it. ``None``: approximate matching.
    tokenizer: str | None = None
    #: A Jinja chat-template file overriding the tokenizer config's template.
    chat_template: str | None = None
    lora_adapters: tuple[LoraAdapter, ...] = ()
    #: How a request is matched: ``tokens`` (tokenize it), ``bytes`` (match its rendered
    #: bytes against the engine's block bytes, issue #9; needs a byte-recoverable tokenizer
    #: and KV events from every endpoint, else tokens), ``auto`` (bytes when they can be
    #: used, else tokens) or ``approximate`` (character chunks, even with a tokenizer).
    matching: str = "auto"


@dataclass(frozen=True, slots=True)
class EndpointConfig:
    #: ``ip:port`` of the engine's HTTP server; also the replica id.
    address: str
    model: str
    #: ZMQ endpoint of the engine's KV-event publisher.
    kv_events: str | None = None
    tenant: str = ""
    kv_events_bind: bool = False
    replay: str | None = None
    topic: str = ""
    metrics_url: str | None = None
    #: Event format of the engine: ``vllm`` or ``sglang``.
    engine: str = "vllm"
    #: vLLM internal data-parallel load balancing: ranks share this one HTTP address (one
    #: replica) and publish on ``kv_events`` (and ``replay``) port + rank, as vLLM offsets them.
    data_parallel_size: int = 1


@dataclass(frozen=True, slots=True)
class TemplateConfig:
    """A PromptTemplate of the serve config (``PUT /templates`` replaces the whole set)."""

    namespace: str
    name: str
    #: The PromptTemplate ``spec`` (``render.TemplateSpec.from_dict`` checks it).
    spec: dict[str, Any]


@dataclass(frozen=True, slots=True)
class WarmupSettings:
    """Template warm-up (``extproc.warmup``): when a template appears or changes, pre-fill
    its stable prefix on the picker's top ``replicas`` of every model with a tokenizer."""

    enabled: bool = False
    #: Replicas per model that get the prefix (the picker's top choices for it).
    replicas: int = 1
    #: Warm-up requests in flight at once (over all templates and models).
    max_concurrency: int = 4
    #: Seconds each warm-up request may take.
    timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"warmup.replicas: must be >= 1, got {self.replicas}")
        if self.max_concurrency < 1:
            raise ValueError(f"warmup.max_concurrency: must be >= 1, got {self.max_concurrency}")
        if self.timeout_s <= 0:
            raise ValueError(f"warmup.timeout_s: must be > 0 seconds, got {self.timeout_s}")


@dataclass(frozen=True, slots=True)
class DiscoverySettings:
    """Endpoint discovery (``extproc.discovery``): ``endpoints[]`` of the CacheBackends'
    Ready engine pods, watched through the Kubernetes API, beside the config file's own."""

    enabled: bool = False
    #: Seconds between full re-lists of CacheBackends and pods (the safety net under the watch).
    interval_s: float = 10.0
    #: Namespace to watch ("" = all namespaces).
    namespace: str = ""

    def __post_init__(self) -> None:
        if self.interval_s <= 0:
            raise ValueError(f"discovery.interval_s: must be > 0 seconds, got {self.interval_s}")


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerSettings = field(default_factory=ServerSettings)
    models: tuple[ModelConfig, ...] = ()
    endpoints: tuple[EndpointConfig, ...] = ()
    #: Seconds between readiness probes of each endpoint.
    health_interval_s: float = 2.0
    #: Seconds between scrapes of each endpoint's ``metrics_url`` (engine load gauges).
    stats_interval_s: float = 10.0
    #: Request size bounds and load shedding (``extproc.openai.Limits``).
    limits: Limits = field(default_factory=Limits)
    #: The predicted-TTFT cost model (``extproc.scoring.ScoringSettings``).
    scoring: ScoringSettings = field(default_factory=ScoringSettings)
    #: PromptTemplates served until the operator (``PUT /templates``) replaces them.
    templates: tuple[TemplateConfig, ...] = ()
    #: Pre-filling the templates' stable prefixes (off by default).
    warmup: WarmupSettings = field(default_factory=WarmupSettings)
    #: Endpoints discovered from the cluster (off by default).
    discovery: DiscoverySettings = field(default_factory=DiscoverySettings)

    def model(self, name: str) -> ModelConfig | None:
        return next((m for m in self.models if m.name == name), None)

    def tenant_of(self, model: str) -> str:
        """The tenant of a model's endpoints ("" when it has none)."""
        return next((e.tenant for e in self.endpoints if e.model == model), "")


# -- strict decoding ---------------------------------------------------------------------

T = TypeVar("T")


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin is tuple:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if is_dataclass(tp):
        return "a mapping"
    return {str: "a string", int: "an integer", float: "a number", bool: "a boolean"}.get(tp, str(tp))


def _decode(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _decode(inner[0], value, path)
    if origin is dict:  # free-form (a PromptTemplate spec): checked by its own decoder
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {_describe(value)}")
        return value
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected {_type_name(tp)}, got {_describe(value)}")
        (item,) = typing.get_args(tp)[:1]
        return tuple(_decode(item, v, f"{path}[{i}]") for i, v in enumerate(value))
    if isinstance(tp, type) and is_dataclass(tp):
        return _decode_dataclass(tp, value, path)
    ok = (
        (tp is bool and isinstance(value, bool))
        or (tp is int and isinstance(value, int) and not isinstance(value, bool))
        or (tp is float and isinstance(value, int | float) and not isinstance(value, bool))
        or (tp is str and isinstance(value, str))
    )
    if not ok:
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {_describe(value)}")
    return float(value) if tp is float else value


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {value!r}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"{type(value).__name__} {value!r}"


def _decode_dataclass(cls: type[T], value: Any, path: str) -> T:
    where = path or "the top level"
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {_describe(value)}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
    for key in value:
        if key not in known:
            raise ConfigError(
                f"{_join(path, str(key))}: unknown key; expected one of {', '.join(sorted(known))}"
            )
    kwargs: dict[str, Any] = {}
    for name, f in known.items():
        if name in value:
            kwargs[name] = _decode(hints[name], value[name], _join(path, name))
        elif f.default is MISSING and f.default_factory is MISSING:
            raise ConfigError(f"{_join(path, name)}: required key is missing")
    try:
        return cls(**kwargs)
    except ValueError as exc:  # a settings class's own checks (e.g. ScoringSettings)
        raise ConfigError(str(exc) if path and str(exc).startswith(path) else f"{where}: {exc}") from None


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def parse(text: str, *, source: str = "<config>") -> Config:
    """Decode and validate a YAML document (an empty document is the default config)."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
    config = _decode_dataclass(Config, {} if raw is None else raw, "")
    validate(config)
    return config


def load(path: str | os.PathLike[str]) -> Config:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"--config {path}: cannot read: {exc.strerror or exc}") from exc
    try:
        return parse(text, source=str(path))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


# -- merging flags and environment -------------------------------------------------------


def _from_text(tp: Any, text: str, where: str) -> Any:
    if tp is bool:
        low = text.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off", ""):
            return False
        raise ConfigError(f"{where}: expected a boolean (true/false), got {text!r}")
    if typing.get_origin(tp) is tuple:
        return tuple(s.strip() for s in text.split(",") if s.strip())
    if tp is int:
        try:
            return int(text.strip())
        except ValueError:
            raise ConfigError(f"{where}: expected an integer, got {text!r}") from None
    return text


def env_name(key: str) -> str:
    return ENV_PREFIX + key.upper()


def merge_server(file: ServerSettings, flags: Mapping[str, Any], env: Mapping[str, str]) -> ServerSettings:
    """Apply precedence flag > environment > file (> default, already in ``file``).

    ``flags`` holds only the flags given on the command line (absent = not given).
    """
    hints = typing.get_type_hints(ServerSettings)
    changes: dict[str, Any] = {}
    for f in fields(ServerSettings):
        if flags.get(f.name) is not None:
            changes[f.name] = flags[f.name]
        elif env_name(f.name) in env:
            changes[f.name] = _from_text(hints[f.name], env[env_name(f.name)], env_name(f.name))
    return replace(file, **changes)


# -- validation -----------------------------------------------------------------------------


def split_host_port(address: str) -> tuple[str, int]:
    """``host:port`` / ``[v6]:port`` / ``:port`` -> (host, port); raises ``ValueError``."""
    host, sep, port_s = address.rpartition(":")
    if not sep or not port_s.isdigit():
        raise ValueError(f"{address!r} is not host:port")
    port = int(port_s)
    if port > 65535:
        raise ValueError(f"{address!r}: port {port} out of range")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, port


def _check_replica_address(address: str, where: str) -> None:
    try:
        host, port = split_host_port(address)
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(
            f"{where}: {address!r} must be ip:port of the engine's HTTP server "
            "(e.g. 10.0.0.7:8000; it is also the replica id the gateway routes to)"
        ) from None
    if port == 0:
        raise ConfigError(f"{where}: {address!r} needs a non-zero port")


def validate(config: Config) -> None:
    """Cross-field checks; raise :class:`ConfigError` with a fix-it message."""
    if config.health_interval_s <= 0:
        raise ConfigError(f"health_interval_s: must be > 0 seconds, got {config.health_interval_s}")
    if config.stats_interval_s <= 0:
        raise ConfigError(f"stats_interval_s: must be > 0 seconds, got {config.stats_interval_s}")
    for f in fields(config.limits):
        value = getattr(config.limits, f.name)
        if value < 0 or (value == 0 and f.name != "shed_ttft_ms"):
            want = ">= 0 (0 = never shed)" if f.name == "shed_ttft_ms" else "> 0"
            raise ConfigError(f"limits.{f.name}: must be {want}, got {value}")
    names: set[str] = set()
    for i, m in enumerate(config.models):
        where = f"models[{i}]"
        if not m.name.strip():
            raise ConfigError(f"{where}.name: must be non-empty")
        if m.name in names:
            raise ConfigError(f"{where}.name: duplicate model {m.name!r}; each model is listed once")
        names.add(m.name)
        if m.block_size <= 0:
            raise ConfigError(
                f"{where}.block_size: must be > 0 (the engine's --block-size), got {m.block_size}"
            )
        if m.matching not in MATCHING_MODES:
            raise ConfigError(
                f"{where}.matching: must be one of {', '.join(MATCHING_MODES)}, got {m.matching!r}"
            )
        seen_names: set[str] = set()
        seen_ids: set[int] = set()
        for j, a in enumerate(m.lora_adapters):
            aw = f"{where}.lora_adapters[{j}]"
            if not a.name or a.name in seen_names:
                raise ConfigError(f"{aw}.name: must be non-empty and unique within the model")
            if a.id <= 0 or a.id in seen_ids:
                raise ConfigError(f"{aw}.id: must be a positive LoRA id, unique within the model")
            seen_names.add(a.name)
            seen_ids.add(a.id)
    addresses: dict[str, int] = {}
    tenants: dict[str, tuple[str, int]] = {}
    for i, e in enumerate(config.endpoints):
        where = f"endpoints[{i}]"
        _check_replica_address(e.address, f"{where}.address")
        if e.address in addresses:
            raise ConfigError(
                f"{where}.address: {e.address!r} is already endpoints[{addresses[e.address]}]; "
                "addresses are replica ids and must be unique"
            )
        addresses[e.address] = i
        if e.model not in names:
            known = ", ".join(sorted(names)) or "none defined"
            raise ConfigError(
                f"{where}.model: unknown model {e.model!r}; add it under models: (known: {known})"
            )
        if e.model in tenants and tenants[e.model][0] != e.tenant:
            first_tenant, first = tenants[e.model]
            raise ConfigError(
                f"{where}.tenant: {e.tenant!r} differs from endpoints[{first}].tenant "
                f"{first_tenant!r}; all endpoints of model {e.model!r} must share one tenant"
            )
        tenants.setdefault(e.model, (e.tenant, i))
        for key, url in (("kv_events", e.kv_events), ("replay", e.replay)):
            if url is not None and not url.startswith(("tcp://", "ipc://", "inproc://")):
                raise ConfigError(
                    f"{where}.{key}: {url!r} must be a ZMQ endpoint (tcp://host:port or ipc://path)"
                )
        if e.engine not in ("vllm", "sglang"):
            raise ConfigError(f"{where}.engine: {e.engine!r} is not one of vllm, sglang")
        if e.data_parallel_size < 1:
            raise ConfigError(f"{where}.data_parallel_size: must be >= 1, got {e.data_parallel_size}")
        if e.data_parallel_size > 1 and not (e.kv_events or "").startswith("tcp://"):
            raise ConfigError(
                f"{where}.data_parallel_size: ranks publish on port + rank, so kv_events must be "
                f"tcp://host:port, got {e.kv_events!r}"
            )
        if e.metrics_url is not None:
            parsed = urllib.parse.urlsplit(e.metrics_url)
            if parsed.scheme not in ("http", "https") or not parsed.netloc:
                raise ConfigError(
                    f"{where}.metrics_url: {e.metrics_url!r} must be an http(s) URL "
                    "(e.g. http://10.0.0.7:8000/metrics)"
                )
    refs: dict[tuple[str, str], int] = {}
    for i, t in enumerate(config.templates):
        try:
            templates_mod.build(t.namespace, t.name, t.spec, where=f"templates[{i}]")
        except templates_mod.TemplateDecodeError as exc:
            raise ConfigError(str(exc)) from None
        first = refs.setdefault((t.namespace, t.name), i)
        if first != i:
            raise ConfigError(f"templates[{i}]: {t.namespace}/{t.name} is already templates[{first}]")
