"""The endpoint picker's contract: what the ext_proc protocol hands the routing policy and
what it gets back, plus the one table of request errors.

Owner: ``inference_cache.extproc``. Place in the flow::

    Envoy --ext_proc stream--> protocol (state machine, body modes)
          --PickRequest-->     Picker.pick   (parse -> tokenize -> keys -> lookup -> score)
          <--Decision | Rejection--
          --Outcome-->         Picker.finished (exactly once per Decision)

The protocol module knows Envoy and nothing about caches; the picker knows caches and
nothing about Envoy. Both sides import only this module from each other.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

#: The endpoint-picker protocol's destination header and ``envoy.lb`` metadata key.
DESTINATION_HEADER = "x-gateway-destination-endpoint"
#: Metadata namespace of the destination (EPP -> proxy) and the served endpoint (proxy -> EPP).
LB_NAMESPACE = "envoy.lb"
#: Metadata namespace and key of the proxy's subset hint.
SUBSET_NAMESPACE = "envoy.lb.subset_hint"
SUBSET_KEY = "x-gateway-destination-endpoint-subset"
#: Key, in ``envoy.lb``, of the endpoint the proxy actually used (response path).
SERVED_KEY = "x-gateway-destination-endpoint-served"
#: Response header explaining a decision (only with ``--debug-decision-header``).
DECISION_HEADER = "x-inference-cache-decision"


class ErrorKind(enum.Enum):
    """Every way we refuse a request; the HTTP status and OpenAI error shape come from
    :data:`ERRORS`, nowhere else."""

    BAD_REQUEST = "bad_request"
    MODEL_NOT_FOUND = "model_not_found"
    TOO_LARGE = "too_large"
    NO_ENDPOINT = "no_endpoint"
    SHED = "shed"
    TEMPLATE_NOT_FOUND = "template_not_found"
    INTERNAL = "internal"


#: kind -> (HTTP status, OpenAI ``error.type``, OpenAI ``error.code``).
ERRORS: Mapping[ErrorKind, tuple[int, str, str | None]] = {
    ErrorKind.BAD_REQUEST: (400, "invalid_request_error", None),
    ErrorKind.MODEL_NOT_FOUND: (404, "invalid_request_error", "model_not_found"),
    ErrorKind.TOO_LARGE: (413, "invalid_request_error", "request_too_large"),
    ErrorKind.NO_ENDPOINT: (503, "service_unavailable", "no_ready_endpoint"),
    ErrorKind.SHED: (429, "rate_limit_exceeded", "overloaded"),
    ErrorKind.TEMPLATE_NOT_FOUND: (404, "invalid_request_error", "template_not_found"),
    ErrorKind.INTERNAL: (500, "internal_error", None),
}


@dataclass(eq=False)
class Rejection(Exception):
    """A refused request: becomes an Envoy ``ImmediateResponse`` with an OpenAI-shaped
    JSON error body. Raise it anywhere on the request path, or return it from ``pick``.
    (Not frozen: ``contextlib`` assigns ``__traceback__`` on exceptions.)"""

    kind: ErrorKind
    message: str
    #: The offending body field, when there is one (OpenAI ``error.param``).
    param: str | None = None

    @property
    def status(self) -> int:
        return ERRORS[self.kind][0]

    def body(self) -> bytes:
        _status, type_, code = ERRORS[self.kind]
        error = {"message": self.message, "type": type_, "param": self.param, "code": code}
        return json.dumps({"error": error}, ensure_ascii=False).encode()


@dataclass(frozen=True, slots=True)
class PickRequest:
    """One HTTP request as the protocol saw it, body complete."""

    method: str
    path: str
    #: Lower-case names (pseudo headers included, e.g. ``:authority``); last value wins.
    headers: Mapping[str, str]
    #: The whole body (``b""`` for a bodiless request).
    body: bytes
    #: The proxy's subset hint; ``None`` when absent (any endpoint of the pool).
    subset: tuple[str, ...] | None = None


@dataclass(slots=True)
class Decision:
    """Where a request goes. ``endpoints[0]`` is the primary, the rest ordered fallbacks
    (the header and metadata value is ``",".join(endpoints)``)."""

    endpoints: tuple[str, ...]
    #: Replacement body for the engine (``None``: forward the client's body unchanged).
    body: bytes | None = None
    #: The ``x-inference-cache-decision`` value; ``None`` unless debugging is enabled.
    debug: str | None = None
    #: What the picker expects the engine to report, for the usage comparison.
    predicted_prompt_tokens: int | None = None
    predicted_cached_tokens: int | None = None
    #: Picker-private state carried to ``finished`` (e.g. the in-flight ticket).
    state: object = field(default=None, repr=False)

    @property
    def destination(self) -> str:
        return ",".join(self.endpoints)


@dataclass(frozen=True, slots=True)
class Usage:
    """``usage`` of an OpenAI response (JSON body or the last SSE event carrying it)."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    #: ``usage.prompt_tokens_details.cached_tokens``.
    cached_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a routed request ended, as far as the protocol could see."""

    #: ``True`` when the response was processed to its end (response processing on).
    response_complete: bool
    #: HTTP status of the response, when its headers were seen.
    status: int | None = None
    #: The proxy's served endpoint (``envoy.lb`` metadata), when forwarded.
    served: str | None = None
    usage: Usage | None = None


class Picker(Protocol):
    """The routing policy behind the ext_proc protocol."""

    async def pick(self, request: PickRequest) -> Decision | Rejection:
        """Choose endpoints for a request; never raises for bad input (``Rejection``)."""
        ...

    def finished(self, decision: Decision, outcome: Outcome) -> None:
        """Called exactly once per returned ``Decision``: at the end of the response when
        response processing is on, else when the ext_proc stream closes."""
        ...
