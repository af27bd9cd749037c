"""``inference-cache serve``: the composition root of the cache-plane server.

Owner: ``inference_cache.extproc``. ``inference_cache.cli`` maps ``serve`` here
(``add_arguments`` / ``run``). Everything the server runs is built here, once, from one
:class:`~inference_cache.config.Config`, and runs on ONE asyncio loop::

    grpc.aio server   --grpc-bind-address      InferenceCache + grpc.health.v1 ("" SERVING)
                                                 + server reflection
    grpc.aio server   --producer-bind-address  (optional) the write RPCs only, + health
    aiohttp public    --http-bind-address      /healthz /readyz /metrics
    aiohttp control   --snapshot-bind-address  /snapshot /policy /templates (ServiceAccount auth)
    index sweep ticker                          Index.sweep() every sweep_interval_s
    one EndpointWorker per endpoints[] entry    probe + KV events + stats scrape
    endpoint discovery (``discovery.enabled``)   CacheBackends + pods watched (re-listed
                                                 every interval_s) -> workers started/
                                                 stopped, picker routes (extproc/discovery.py)
    template warm-up (``warmup.enabled``)       the config's templates at start, then
                                                every PUT /templates (extproc/warmup.py)

Flags are the original's (``--grpc-bind-address`` ... ``--log-level``; ``:port`` = all
interfaces) plus ``--config FILE`` and the producer options:

- ``--producer-bind-address ADDR``: serve ReportCacheState and PublishEvent ONLY there; on
  the main gRPC port they answer ``UNIMPLEMENTED`` (and the read RPCs answer
  ``UNIMPLEMENTED`` on the producer port). Lets a NetworkPolicy keep writers apart.
- ``--allowed-producer-sa SA`` (repeatable and/or comma-separated): require on the write RPCs
  gRPC metadata ``authorization: Bearer <token>`` whose TokenReview (audience
  ``--producer-audience``, default ``inferencecache.io/producer``) names one of these
  ServiceAccounts. Missing/invalid token -> ``UNAUTHENTICATED``, another identity ->
  ``PERMISSION_DENIED``, review unavailable -> ``UNAVAILABLE`` (fail closed). Results are
  counted in ``inferencecache_producer_auth_total{result}``. Unset: writes are open, as in
  the original.

Exit codes: 0 after a graceful shutdown (SIGINT/SIGTERM), 2 for invalid flags or config
(message on stderr), 1 when serving fails (``serve_error``) or TLS/in-cluster setup fails.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TextIO

import aiohttp
import grpc
import prometheus_client
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from kubernetes import client as k8s

from inference_cache import __version__ as _version
from inference_cache import config as config_mod
from inference_cache import enginestats
from inference_cache import tokenizer as tokenizer_mod
from inference_cache.extproc import (
    auth,
    discovery,
    endpoints,
    grpc_api,
    http,
    picker,
    protocol,
    templates,
    tls,
    warmup,
)
from inference_cache.extproc.metrics import IndexReadings, IngestReadings, ModelMatching, ServerMetrics
from inference_cache.index import bytekeys, snapshot, store, types
from inference_cache.index import policy as policy_mod
from inference_cache.operator import kube
from inference_cache.proto import pb, pb_grpc

log = logging.getLogger("inference_cache.serve")

#: Bytes of ext_proc message beyond ``limits.max_body_bytes`` (headers, metadata, framing).
EXTPROC_MESSAGE_HEADROOM = 1 << 20
#: Seconds between sweeps of the picker's expired speculative entries.
PICKER_SWEEP_INTERVAL_S = 1.0
#: Speculative keys one slice of that sweep drops before it yields to the event loop
#: (about 1 ms of work: requests never wait behind a whole burst's expiry).
PICKER_SWEEP_SLICE_KEYS = 4096
#: Seconds in-flight RPCs get to finish on shutdown (the HTTP servers get the same).
SHUTDOWN_GRACE_S = 5.0

LOG_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
LOG_FORMATS = ("json", "text")
BODY_MODES = ("auto", "buffered", "full-duplex")
ROUTING_MODES = ("cache-aware", "round-robin")


# -- flags ---------------------------------------------------------------------------------

#: field -> help text; every ServerSettings field has one.
_FLAG_HELP: dict[str, str] = {
    "grpc_bind_address": "gRPC listen address (':port' = all interfaces)",
    "http_bind_address": "public HTTP listen address: /healthz /readyz /metrics",
    "snapshot_bind_address": "controller-only HTTP listen address: /snapshot /policy /templates",
    "allowed_controller_sa": "the ServiceAccount allowed on /snapshot, /policy and /templates, e.g. "
    "system:serviceaccount:inference-cache-system:inference-cache-operator",
    "insecure_disable_auth": "no auth on /snapshot, /policy and /templates (local development only)",
    "controller_audience": "TokenReview audience of controller tokens",
    "tls_cert_file": "PEM certificate for gRPC TLS (with --tls-key-file)",
    "tls_key_file": "PEM private key for gRPC TLS (with --tls-cert-file)",
    "log_format": "json or text",
    "log_level": "debug, info, warn or error",
    "producer_bind_address": "serve ReportCacheState/PublishEvent only on this gRPC address",
    "allowed_producer_sa": "require a bearer token of this ServiceAccount on the write RPCs "
    "(repeatable, or comma-separated)",
    "producer_audience": "TokenReview audience of producer tokens",
    "extproc_bind_address": "Envoy ext_proc (endpoint picker) gRPC listen address",
    "extproc_body_mode": "auto (Envoy's protocol_config, else buffered), buffered or full-duplex",
    "routing": "cache-aware or round-robin (a baseline doing the same ext_proc work)",
    "fallback_endpoints": "fallback endpoints listed after the primary in the destination",
    "tenant_header": "trust the x-inference-cache-tenant request header for policy",
    "debug_decision_header": "add x-inference-cache-decision to responses (reveals cache state)",
}


def _parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "t", "true"):
        return True
    if low in ("0", "f", "false"):
        return False
    raise argparse.ArgumentTypeError(f"invalid boolean value {text!r}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The serve flags (``--name value``, ``--name=value`` and Go's ``-name value``).

    Defaults are ``None`` so precedence (flag > env > file > default) can tell an absent
    flag from a given one; the help shows the real defaults."""
    parser.add_argument(
        "--config", "-config", metavar="FILE", help="YAML configuration (see inference_cache.config)"
    )
    defaults = config_mod.ServerSettings()
    for f in fields(config_mod.ServerSettings):
        flag = "--" + f.name.replace("_", "-")
        go_flag = flag[1:]  # Go's flag package also takes -name
        default = getattr(defaults, f.name)
        help_ = f"{_FLAG_HELP[f.name]} (default {default!r}; env {config_mod.env_name(f.name)})"
        if isinstance(default, bool):
            parser.add_argument(
                flag,
                go_flag,
                nargs="?",
                const=True,
                type=_parse_bool,
                default=None,
                metavar="BOOL",
                help=help_,
            )
        elif isinstance(default, tuple):
            parser.add_argument(flag, go_flag, action="append", default=None, metavar="SA", help=help_)
        elif isinstance(default, int):
            parser.add_argument(flag, go_flag, type=int, default=None, metavar="N", help=help_)
        else:
            parser.add_argument(flag, go_flag, default=None, metavar="VALUE", help=help_)


def _given_flags(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in fields(config_mod.ServerSettings):
        value = getattr(args, f.name, None)
        if value is None:
            continue
        if f.name == "allowed_producer_sa":
            value = tuple(sa for item in value for sa in item.split(","))
        out[f.name] = value
    return out


class UsageError(Exception):
    """Invalid flags or configuration: exit 2 with the message on stderr."""


def load_config(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> config_mod.Config:
    """File + environment + flags -> a validated config; raises :class:`UsageError`."""
    try:
        cfg = config_mod.load(args.config) if getattr(args, "config", None) else config_mod.Config()
        server = config_mod.merge_server(cfg.server, _given_flags(args), environ)
    except config_mod.ConfigError as exc:
        raise UsageError(str(exc)) from exc
    problem = validate_server(server)
    if problem:
        raise UsageError(problem)
    return dataclasses.replace(cfg, server=server)


def validate_server(s: config_mod.ServerSettings) -> str | None:
    """The startup flag rules; a message (exit 2) or ``None``."""
    if s.log_format.strip().lower() not in (*LOG_FORMATS, ""):
        return f'invalid --log-format "{s.log_format}": want json or text'
    if s.log_level.strip().lower() not in LOG_LEVELS:
        return f'invalid --log-level "{s.log_level}": want debug, info, warn or error'
    problem = auth.validate_controller_auth_flags(
        allowed_controller_sa=s.allowed_controller_sa,
        insecure_disable_auth=s.insecure_disable_auth,
        controller_audience=s.controller_audience,
    )
    if problem:
        return problem
    if bool(s.tls_cert_file) != bool(s.tls_key_file):
        return "--tls-cert-file and --tls-key-file must be set together (both for TLS, neither for plaintext)"
    for sa in s.allowed_producer_sa:
        if not sa or sa.strip() != sa:
            return f"--allowed-producer-sa has an empty entry or leading/trailing whitespace ({sa!r})"
    if s.allowed_producer_sa and (
        not s.producer_audience.strip() or s.producer_audience.strip() != s.producer_audience
    ):
        return (
            "--producer-audience must be non-empty and without leading/trailing whitespace "
            "when --allowed-producer-sa is set"
        )
    if s.extproc_body_mode not in BODY_MODES:
        return f'invalid --extproc-body-mode "{s.extproc_body_mode}": want {", ".join(BODY_MODES)}'
    if s.routing not in ROUTING_MODES:
        return f'invalid --routing "{s.routing}": want {" or ".join(ROUTING_MODES)}'
    if s.fallback_endpoints < 0:
        return f"invalid --fallback-endpoints {s.fallback_endpoints}: want >= 0"
    for flag, address in (
        ("--grpc-bind-address", s.grpc_bind_address),
        ("--extproc-bind-address", s.extproc_bind_address),
        ("--http-bind-address", s.http_bind_address),
        ("--snapshot-bind-address", s.snapshot_bind_address),
        ("--producer-bind-address", s.producer_bind_address or ":0"),
    ):
        try:
            config_mod.split_host_port(address)
        except ValueError as exc:
            return f"invalid {flag}: {exc}"
    return None


# -- logging ---------------------------------------------------------------------------------

_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _RECORD_ATTRS and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    """slog-style JSON lines: ``{"time", "level", "msg", ...extras}``."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": "WARN" if record.levelno == logging.WARNING else record.levelname,
            "msg": record.getMessage(),
            **_extras(record),
        }
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class TextFormatter(logging.Formatter):
    """slog-style text lines: ``time=... level=INFO msg=startup key=value``."""

    def format(self, record: logging.LogRecord) -> str:
        level = "WARN" if record.levelno == logging.WARNING else record.levelname
        parts = [f"time={time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(record.created))}", f"level={level}"]
        parts += [f"msg={json.dumps(record.getMessage())}"]
        parts += [f"{k}={json.dumps(v, default=str)}" for k, v in _extras(record).items()]
        return " ".join(parts)


def configure_logging(log_format: str, log_level: str, stream: TextIO = sys.stderr) -> None:
    handler = logging.StreamHandler(stream)
    handler.setFormatter(TextFormatter() if log_format.strip().lower() == "text" else JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(LOG_LEVELS[log_level.strip().lower()])


# -- the server --------------------------------------------------------------------------------


def listen_host(address: str) -> tuple[str | None, int]:
    """``host:port`` -> (aiohttp host, port); ``:port`` -> all interfaces (``None``)."""
    host, port = config_mod.split_host_port(address)
    return (host or None), port


def grpc_address(address: str) -> str:
    host, port = config_mod.split_host_port(address)
    if not host:
        return f"[::]:{port}"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def index_readings(index: store.Index) -> IndexReadings:
    return IndexReadings(
        entries_by_model=index.entries_by_model(),
        entries=index.total_entries,
        distinct_keys=index.distinct_prefixes,
        replica_stats=index.stats_count,
        tenant_evictions={(t, "over_entries"): n for t, n in index.tenant_evictions.items()},
        index_evictions=dict(index.index_evictions),
    )


def ingest_readings(workers: Sequence[endpoints.EndpointWorker]) -> IngestReadings:
    events: dict[str, int] = {}
    skipped: dict[str, int] = {}
    totals = dict.fromkeys(("decode_errors", "gaps", "replays", "resyncs", "orphan_blocks"), 0)
    batches: dict[str, int] = {}
    for w in workers:
        c = w.counters
        if w.subscriber is not None:
            batches[w.endpoint.address] = c.batches + c.replayed_batches
        for k, n in c.events.items():
            events[k] = events.get(k, 0) + n
        for k, n in c.skipped_blocks.items():
            skipped[k] = skipped.get(k, 0) + n
        totals["decode_errors"] += sum(c.decode_errors.values())
        totals["gaps"] += c.gaps
        totals["replays"] += c.replays_requested
        totals["resyncs"] += c.resyncs
        totals["orphan_blocks"] += c.orphan_blocks
    return IngestReadings(events=events, skipped_blocks=skipped, batches_by_endpoint=batches, **totals)


class ProducerAuthenticator:
    """Admits a bearer token of any ServiceAccount in ``allowed`` (one TokenReview per
    distinct token and SA, cached 30 s by ``auth.Authenticator``)."""

    def __init__(self, reviewer: auth.TokenReviewer, *, allowed: Sequence[str], audience: str) -> None:
        self._chain = [auth.Authenticator(reviewer, expected_sa=sa, audience=audience) for sa in allowed]

    async def __call__(self, authorization: str | None) -> auth.AuthResult:
        result = auth.AuthResult.FORBIDDEN
        for authn in self._chain:
            result = await authn.authenticate(authorization)
            # Only "another identity" can be another SA's success; anything else is final.
            if result is not auth.AuthResult.FORBIDDEN:
                return result
        return result


@dataclass(frozen=True, slots=True)
class BoundAddresses:
    """Where the listeners actually bound (``host:port``, ports resolved)."""

    grpc: str
    http: str
    snapshot: str
    producer: str | None
    extproc: str


def load_tokenizers(config: config_mod.Config) -> dict[str, tokenizer_mod.PromptTokenizer]:
    """model name -> tokenizer, for models with ``tokenizer`` set; raises ``ConfigError``."""
    out: dict[str, tokenizer_mod.PromptTokenizer] = {}
    for i, m in enumerate(config.models):
        if not m.tokenizer:
            continue
        try:
            out[m.name] = tokenizer_mod.PromptTokenizer.load(
                Path(m.tokenizer), Path(m.chat_template) if m.chat_template else None
            )
        except Exception as exc:  # OSError, ValueError, or tokenizers' plain Exception
            raise config_mod.ConfigError(
                f"models[{i}].tokenizer: cannot load {m.tokenizer!r}: {exc} (a local directory with "
                "tokenizer.json and tokenizer_config.json, or a tokenizer.json file)"
            ) from exc
    return out


def build_byte_indexes(
    config: config_mod.Config, tokenizers: Mapping[str, tokenizer_mod.PromptTokenizer]
) -> dict[str, bytekeys.ByteIndex]:
    """model name -> an empty ``ByteIndex`` for each model with a tokenizer and ``matching:
    auto`` or ``bytes``. Its table says whether the tokenizer is byte-recoverable (only those
    are fed by the subscribers); the picker decides per model, and again on every endpoint
    change, whether the byte path is used (``picker.choose_matching``)."""
    out: dict[str, bytekeys.ByteIndex] = {}
    for m in config.models:
        tok = tokenizers.get(m.name)
        if tok is not None and m.matching in ("auto", "bytes"):
            out[m.name] = bytekeys.ByteIndex(bytekeys.ByteTable.of(tok.tokenizer), m.block_size)
    return out


def matching_readings(
    pick: picker.EndpointPicker, byte_indexes: Mapping[str, bytekeys.ByteIndex]
) -> list[ModelMatching]:
    """Each model's matching mode and byte-path numbers, for ``/metrics``."""
    out = []
    for name, route in pick.routes.items():
        bidx = byte_indexes.get(name)
        out.append(
            ModelMatching(
                model=name,
                requested=route.model.matching,
                mode=route.matching,
                byte_entries=bidx.entries if bidx is not None else 0,
                byte_bytes=bidx.approx_bytes() if bidx is not None else 0,
                boundaries={o: n for (m, o), n in pick.byte_boundaries.items() if m == name},
                fallbacks={r: n for (m, r), n in pick.byte_fallbacks.items() if m == name},
            )
        )
    return out


def load_templates(config: config_mod.Config) -> list[templates.StoredTemplate]:
    """The config's ``templates:`` decoded; raises ``ConfigError``."""
    try:
        return [
            templates.build(t.namespace, t.name, t.spec, where=f"templates[{i}]")
            for i, t in enumerate(config.templates)
        ]
    except templates.TemplateDecodeError as exc:
        raise config_mod.ConfigError(str(exc)) from None


def freeze_long_lived() -> None:
    """Collect, then move every surviving object out of the cyclic GC's reach.

    The tokenizers, templates and other start-up state are long-lived objects a full
    collection would otherwise walk each time (measured when the index itself was still
    GC-tracked: decision p99 4.1 -> 2.0 ms, max 38 -> 2.6 ms at 8k-token follow-ups,
    ``docs/benchmarks.md``; the index, byte chain and speculative entries are now
    untracked ints and bytes, "GC pauses" there). Reference counting still frees frozen
    objects; what a freeze keeps forever is a reference cycle that was alive at the
    freeze and dies later (an in-flight request's, say). Measured: the frozen count stays
    flat (83-86k) over 6,000 ext_proc requests frozen every 0.5 s. Called at startup and on
    every index sweep tick."""
    gc.collect()
    gc.freeze()


class Server:
    """Build from a config, ``await start()``, ``await stop()``; tests run it in-process."""

    def __init__(
        self,
        config: config_mod.Config,
        *,
        index_settings: store.IndexSettings | None = None,
        reviewer: auth.TokenReviewer | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.perf_counter,
        stream_metrics_interval_s: float = 10.0,
        stream_queue_size: int = 1024,
        tokenizers: dict[str, tokenizer_mod.PromptTokenizer] | None = None,
        freeze_gc: bool = False,
        discovery_kube: kube.Kube | None = None,
    ) -> None:
        """``freeze_gc``: :func:`freeze_long_lived` at startup and every sweep tick (the
        ``serve`` command sets it; in-process embedders and tests keep their GC as is).
        ``discovery_kube``: the API client of endpoint discovery (needed when
        ``discovery.enabled``; ``serve`` builds it from the pod's ServiceAccount)."""
        self._freeze_gc = freeze_gc
        self.config = config
        s = config.server
        self.policies = policy_mod.PolicyStore()
        self.index = store.Index(index_settings, policies=self.policies, clock=clock)
        self.workers: list[endpoints.EndpointWorker] = []
        #: address -> the running worker's task (config file and discovered endpoints).
        self._worker_tasks: dict[str, asyncio.Task[None]] = {}
        #: Cancelled worker tasks not yet finished (awaited by ``stop``).
        self._stopping: set[asyncio.Task[None]] = set()
        if config.discovery.enabled and discovery_kube is None:
            raise RuntimeError("endpoint discovery needs a Kube client")
        self._discovery_kube = discovery_kube
        self._ready: dict[str, bool] = {}
        #: PromptTemplates: the config's ``templates:`` until ``PUT /templates`` replaces them.
        initial_templates = load_templates(config)
        self.templates = templates.TemplateStore(initial_templates)
        self.metrics = ServerMetrics(
            read_index=lambda: index_readings(self.index),
            read_ingest=lambda: ingest_readings(self.workers),
            read_matching=lambda: matching_readings(self.picker, self.byte_indexes),
        )
        toks = tokenizers if tokenizers is not None else load_tokenizers(config)
        all_byte_indexes = build_byte_indexes(config, toks)
        #: model -> its byte-chain index, for the byte-recoverable ones (fed by the subscribers).
        self.byte_indexes = {m: b for m, b in all_byte_indexes.items() if b.table.recoverable}
        if self.byte_indexes:
            self.index.add_eviction_listener(self._bytes_evicted)
            self.index.add_clear_listener(self._bytes_cleared)
        self.picker = picker.EndpointPicker(
            config,
            self.index,
            self.policies,
            settings=picker.PickerSettings(
                routing=s.routing,
                fallback_endpoints=s.fallback_endpoints,
                tenant_header=s.tenant_header,
                debug_header=s.debug_decision_header,
                limits=config.limits,
                scoring=config.scoring,
            ),
            tokenizers=toks,
            byte_indexes=all_byte_indexes,
            is_ready=lambda rid: self._ready.get(rid, True),
            observer=self.metrics.extproc,
            templates=self.templates,
        )
        #: Pre-fills new template revisions (``None`` unless ``warmup.enabled``).
        self.warmer: warmup.Warmer | None = None
        if config.warmup.enabled:
            self.warmer = warmup.Warmer(self.picker, config.warmup, registry=self.metrics.registry)
            self.warmer.changed(initial_templates)
            self.templates.on_replace = self.warmer.changed
        self._reviewer = reviewer
        self._clock = clock
        self._monotonic = monotonic
        self._stream_metrics_interval_s = stream_metrics_interval_s
        self._stream_queue_size = stream_queue_size
        #: Raises ``tls.TLSLoadError`` for an unloadable keypair (``run`` exits 1).
        self._credentials = tls.load_grpc_server_credentials(s.tls_cert_file, s.tls_key_file)
        self.metrics.grpc_tls_enabled.set(1 if self._credentials is not None else 0)
        self._grpc: grpc.aio.Server | None = None
        self._producer: grpc.aio.Server | None = None
        self._extproc: grpc.aio.Server | None = None
        self._health: list[health.aio.HealthServicer] = []
        self._runners: list[web.AppRunner] = []
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.addresses: BoundAddresses | None = None

    def _bytes_evicted(self, scope: types.Scope, replica_id: str, keys: Sequence[bytes]) -> None:
        bidx = self.byte_indexes.get(scope.model)
        if bidx is not None:
            bidx.blocks_removed(scope, replica_id, keys)

    def _bytes_cleared(self, replica_id: str, model: str, tenant: str) -> None:
        bidx = self.byte_indexes.get(model)
        if bidx is not None:
            bidx.replica_cleared(replica_id, model=model, tenant=tenant)

    # -- building blocks --------------------------------------------------------------------
    def _authenticator(self, counter: Callable[[str], None]) -> auth.Authenticator | None:
        s = self.config.server
        if s.insecure_disable_auth:
            return None
        if self._reviewer is None:
            raise RuntimeError("controller auth needs a TokenReviewer")
        return auth.Authenticator(
            self._reviewer,
            expected_sa=s.allowed_controller_sa,
            audience=s.controller_audience,
            on_result=counter,
        )

    def _service(self, *, reads: bool, writes: bool) -> grpc_api.InferenceCacheService:
        s = self.config.server
        producer_auth = None
        if writes and s.allowed_producer_sa:
            if self._reviewer is None:
                raise RuntimeError("producer auth needs a TokenReviewer")
            producer_auth = ProducerAuthenticator(
                self._reviewer, allowed=s.allowed_producer_sa, audience=s.producer_audience
            )
        return grpc_api.InferenceCacheService(
            index=self.index,
            policies=self.policies,
            config=self.config,
            metrics=self.metrics,
            reads=reads,
            writes=writes,
            producer_auth=producer_auth,
            clock=self._clock,
            monotonic=self._monotonic,
            stream_queue_size=self._stream_queue_size,
            metrics_interval_s=self._stream_metrics_interval_s,
            picker=self.picker,
            templates=self.templates,
        )

    async def _grpc_server(
        self, service: grpc_api.InferenceCacheService, address: str
    ) -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server()
        pb_grpc.add_InferenceCacheServicer_to_server(service, server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        self._health.append(health_servicer)
        reflection.enable_server_reflection(
            (
                pb.DESCRIPTOR.services_by_name["InferenceCache"].full_name,
                health.SERVICE_NAME,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        target = grpc_address(address)
        creds = self._port_credentials()
        port = server.add_secure_port(target, creds) if creds else server.add_insecure_port(target)
        await server.start()
        return server, port

    def _port_credentials(self) -> grpc.ServerCredentials | None:
        """TLS credentials for one gRPC port: grpc refuses to share one dynamic credentials
        object between ports, so each port loads its own from the same files (the keypair
        was already checked in ``__init__``)."""
        if self._credentials is None:
            return None
        s = self.config.server
        return tls.load_grpc_server_credentials(s.tls_cert_file, s.tls_key_file)

    async def _extproc_server(self, address: str) -> tuple[grpc.aio.Server, int]:
        """The Envoy ext_proc listener: the endpoint picker + gRPC health (``""`` and the
        ext_proc service name, which Envoy's ``grpc_health_check`` asks for)."""
        s = self.config.server
        # gRPC's default 4 MiB message cap would turn any body over it into a stream error
        # (a 500 from Envoy): let through what limits.max_body_bytes allows, plus headroom
        # for the message framing; the protocol answers 413 beyond it.
        cap = self.config.limits.max_body_bytes + EXTPROC_MESSAGE_HEADROOM
        server = grpc.aio.server(
            options=[("grpc.max_receive_message_length", cap), ("grpc.max_send_message_length", cap)]
        )
        service = protocol.ExtProcService(
            self.picker,
            protocol.ProtocolSettings(
                body_mode=s.extproc_body_mode,
                max_body_bytes=self.config.limits.max_body_bytes,
                response_processing=True,
                debug_header=s.debug_decision_header,
            ),
            observer=self.metrics.extproc,
        )
        protocol.add_to_server(service, server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        for name in ("", protocol.SERVICE_NAME):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._health.append(health_servicer)
        target = grpc_address(address)
        creds = self._port_credentials()
        port = server.add_secure_port(target, creds) if creds else server.add_insecure_port(target)
        await server.start()
        return server, port

    def _on_ready_change(self, replica_id: str, ready: bool) -> None:
        self._ready[replica_id] = ready
        self.metrics.endpoint_ready.labels(replica_id).set(1 if ready else 0)

    def _on_engine_stats(self, replica_id: str, stats: enginestats.EngineStats | None) -> None:
        self.picker.observe_engine(replica_id, stats)

    async def _http_site(self, app: web.Application, address: str) -> str:
        runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=SHUTDOWN_GRACE_S)
        await runner.setup()
        self._runners.append(runner)
        host, port = listen_host(address)
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0][1]
        return f"{host or ''}:{bound}"

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> BoundAddresses:
        """Index first, then listeners, then background tasks (the original's order)."""
        s = self.config.server
        self.index.start()
        split = bool(s.producer_bind_address)
        self._grpc, grpc_port = await self._grpc_server(
            self._service(reads=True, writes=not split), s.grpc_bind_address
        )
        producer = None
        if split:
            self._producer, producer_port = await self._grpc_server(
                self._service(reads=False, writes=True), s.producer_bind_address
            )
            producer = f"{config_mod.split_host_port(s.producer_bind_address)[0]}:{producer_port}"
        self._extproc, extproc_port = await self._extproc_server(s.extproc_bind_address)
        public = http.build_public_app(is_ready=lambda: self.index.ready, registry=self.metrics.registry)
        controller = http.build_controller_app(
            snapshot_json=lambda: snapshot.encode_json(self.index.snapshot()),
            policies=self.policies,
            snapshot_auth=self._authenticator(lambda r: self.metrics.snapshot_auth.labels(r).inc()),
            policy_auth=self._authenticator(lambda r: self.metrics.policy_auth.labels(r).inc()),
            templates=self.templates,
            templates_auth=self._authenticator(lambda r: self.metrics.templates_auth.labels(r).inc()),
        )
        http_addr = await self._http_site(public, s.http_bind_address)
        snapshot_addr = await self._http_site(controller, s.snapshot_bind_address)
        self._session = aiohttp.ClientSession()
        for e in self.config.endpoints:
            self._start_worker(e)
        if self.config.discovery.enabled:
            assert self._discovery_kube is not None  # checked in __init__
            self._tasks.append(
                asyncio.create_task(
                    discovery.watch(self._discovery_kube, self.config, self.set_endpoints),
                    name="endpoint-discovery",
                )
            )
        self._tasks.append(asyncio.create_task(self._sweep_ticker(), name="index-sweep"))
        self._tasks.append(asyncio.create_task(self._picker_ticker(), name="picker-sweep"))
        if self.warmer is not None:
            self.warmer.start()
        if self._freeze_gc:
            freeze_long_lived()
        self.metrics.gc_pauses.start()
        self.addresses = BoundAddresses(
            grpc=f"{config_mod.split_host_port(s.grpc_bind_address)[0]}:{grpc_port}",
            http=http_addr,
            snapshot=snapshot_addr,
            producer=producer,
            extproc=f"{config_mod.split_host_port(s.extproc_bind_address)[0]}:{extproc_port}",
        )
        self.metrics.up.set(1)
        return self.addresses

    # -- endpoints ------------------------------------------------------------------------------
    def _start_worker(self, e: config_mod.EndpointConfig) -> None:
        model = self.config.model(e.model)
        assert model is not None  # validated: every endpoint names a configured model
        assert self._session is not None  # started
        worker = endpoints.EndpointWorker(
            e,
            model,
            self.index,
            self._session,
            health_interval_s=self.config.health_interval_s,
            stats_interval_s=self.config.stats_interval_s,
            on_ready_change=self._on_ready_change,
            on_stats=self._on_engine_stats,
            byte_index=self.byte_indexes.get(e.model),
        )
        self.metrics.endpoint_ready.labels(worker.replica_id).set(1)
        self.workers.append(worker)
        self._worker_tasks[e.address] = asyncio.create_task(worker.run(), name=f"endpoint:{e.address}")

    def _stop_worker(self, address: str) -> None:
        """Cancel the worker (its subscriber closes its sockets), forget its readiness and
        drop what the index holds for it."""
        task = self._worker_tasks.pop(address)
        task.cancel()
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)
        worker = next(w for w in self.workers if w.replica_id == address)
        self.workers.remove(worker)
        self._ready.pop(address, None)
        self.metrics.endpoint_ready.remove(address)
        self.metrics.extproc.forget_endpoint(address)
        self.index.replica_cleared(address, model=worker.endpoint.model, tenant=worker.endpoint.tenant)

    def _discover(self) -> list[config_mod.EndpointConfig]:
        assert self._discovery_kube is not None
        return discovery.discover(self._discovery_kube, self.config, self.config.discovery.namespace)

    def set_endpoints(self, discovered: Sequence[config_mod.EndpointConfig]) -> None:
        """Run the config file's endpoints plus ``discovered``: start and stop workers, and
        give the picker each model's new endpoint list (discovery calls it on every change)."""
        wanted = discovery.desired(self.config.endpoints, discovered)
        change = discovery.plan({w.replica_id: w.endpoint for w in self.workers}, wanted)
        if change.empty:
            return
        for address in change.stop:
            self._stop_worker(address)
        for e in change.start:
            self._start_worker(e)
        for m in self.config.models:
            self.picker.set_endpoints(m.name, [e for e in wanted if e.model == m.name])
        log.info(
            "endpoints_changed",
            extra={"started": [e.address for e in change.start], "stopped": list(change.stop)},
        )

    async def discover_once(self) -> None:
        """One full discovery poll now (a list of CacheBackends and pods, beside the watch)."""
        await discovery.refresh(self._discover, self.set_endpoints)

    async def _picker_ticker(self) -> None:
        """Expired speculative entries go off the request path, once a second, in slices
        with the event loop free between them."""
        while True:
            await asyncio.sleep(PICKER_SWEEP_INTERVAL_S)
            more = self.picker.sweep(PICKER_SWEEP_SLICE_KEYS)
            while more:
                await asyncio.sleep(0)  # let requests through between slices
                more = self.picker.sweep(PICKER_SWEEP_SLICE_KEYS)

    async def _sweep_ticker(self) -> None:
        while True:
            await asyncio.sleep(self.index.settings.sweep_interval_s)
            self.index.sweep()
            if self._freeze_gc:
                freeze_long_lived()

    async def stop(self, grace: float = SHUTDOWN_GRACE_S) -> None:
        """Graceful: health NOT_SERVING, gRPC drains ``grace`` s, HTTP closes, tasks end."""
        self.metrics.up.set(0)
        self.metrics.gc_pauses.stop()
        for h in self._health:
            await h.enter_graceful_shutdown()
        for server in (self._extproc, self._grpc, self._producer):
            if server is not None:
                await server.stop(grace)
        for runner in self._runners:
            await runner.cleanup()
        if self.warmer is not None:
            await self.warmer.stop()
        tasks = [*self._tasks, *self._worker_tasks.values(), *self._stopping]
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
        self.index.stop()
        self._grpc = self._producer = self._extproc = self._session = None
        self._runners, self._tasks, self._health = [], [], []
        self._worker_tasks, self._stopping = {}, set()
        for r in results:
            if isinstance(r, Exception):
                log.warning("task_failed_on_shutdown", extra={"error": repr(r)})


# -- the subcommand ----------------------------------------------------------------------------


async def serve(server: Server) -> int:
    """Run until SIGINT/SIGTERM; 0 after a graceful shutdown."""
    config = server.config
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        addrs = await server.start()
        log.info(
            "startup",
            extra={
                "version": _version,
                "grpc_addr": addrs.grpc,
                "grpc_tls": config.server.tls_cert_file != "",
                "http_addr": addrs.http,
                "snapshot_addr": addrs.snapshot,
                "producer_addr": addrs.producer or "",
                "extproc_addr": addrs.extproc,
                "endpoints": len(config.endpoints),
                "matching": {name: r.matching for name, r in server.picker.routes.items()},
            },
        )
        await stop.wait()
        log.info("graceful_shutdown_started")
    finally:
        await server.stop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    log.info("graceful_shutdown_done")
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args)
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return 2
    s = cfg.server
    configure_logging(s.log_format, s.log_level)
    # Go parity: no ``*_created`` series on /metrics.
    prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]
    reviewer: auth.KubeTokenReviewer | None = None
    if s.allowed_controller_sa or s.allowed_producer_sa:
        try:
            reviewer = auth.KubeTokenReviewer(auth.in_cluster_config())
        except auth.InClusterConfigError as exc:
            log.error("kube_client_failed", extra={"error": str(exc)})
            return 1
    kube_api: k8s.ApiClient | None = None
    if cfg.discovery.enabled:
        try:
            kube_api = discovery.api_client(auth.in_cluster_config())
        except auth.InClusterConfigError as exc:
            log.error("kube_client_failed", extra={"error": str(exc)})
            return 1
    try:
        server = Server(
            cfg,
            reviewer=reviewer,
            freeze_gc=True,
            discovery_kube=kube.Kube(kube_api) if kube_api is not None else None,
        )
    except config_mod.ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    except tls.TLSLoadError as exc:
        log.error("grpc_tls_load_failed", extra={"error": str(exc)})
        return 1
    if s.allowed_controller_sa:
        log.info(
            "controller_auth_enabled",
            extra={"expected_sa": s.allowed_controller_sa, "audience": s.controller_audience},
        )
    else:
        log.warning("controller_auth_disabled")
    if s.allowed_producer_sa:
        log.info(
            "producer_auth_enabled",
            extra={"allowed_sa": list(s.allowed_producer_sa), "audience": s.producer_audience},
        )

    async def main() -> int:
        try:
            return await serve(server)
        finally:
            if reviewer is not None:
                await reviewer.close()
            if kube_api is not None:
                kube_api.close()  # type: ignore[no-untyped-call]  # untyped in kubernetes

    try:
        return asyncio.run(main())
    except Exception as exc:
        log.error("serve_error", extra={"error": repr(exc)})
        return 1
