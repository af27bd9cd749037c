"""The ``usage`` of an OpenAI-compatible response, read from a whole JSON body or
incrementally from a ``text/event-stream`` (SSE) body.

Owner: ``inference_cache.extproc`` (the ext_proc response path). Place in the flow::

    Envoy response_body chunks --> protocol --> parse_json (buffered JSON body)
                                            --> SseUsage.feed (each chunk, as it passes)
                               --> picking.Usage --> Picker.finished / observer

Engines report ``usage.prompt_tokens`` and ``usage.prompt_tokens_details.cached_tokens``;
the picker compares them with its prediction. Nothing here raises on bad input: a body
that is not what we expect simply yields no usage.
"""

from __future__ import annotations

import json
from typing import Any

from inference_cache.extproc.picking import Usage

#: Longest SSE line (or multi-line event) kept while waiting for its end; a longer one is
#: skipped (usage events are a few hundred bytes, so nothing useful is lost).
MAX_SSE_LINE_BYTES = 1 << 20

_USAGE_MARK = b'"usage"'


def _count(value: Any) -> int | None:
    # bool is an int subclass; a count is a non-negative integer and nothing else.
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def from_object(obj: Any) -> Usage | None:
    """``Usage`` of a decoded response object (``{"usage": {...}}``), ``None`` without one."""
    if not isinstance(obj, dict):
        return None
    usage = obj.get("usage")
    if not isinstance(usage, dict):
        return None
    details = usage.get("prompt_tokens_details")
    cached = _count(details.get("cached_tokens")) if isinstance(details, dict) else None
    result = Usage(
        prompt_tokens=_count(usage.get("prompt_tokens")),
        completion_tokens=_count(usage.get("completion_tokens")),
        cached_tokens=cached,
    )
    return None if result == Usage() else result


def _decode(data: bytes) -> Usage | None:
    if _USAGE_MARK not in data:  # cheap filter: most stream events carry no usage
        return None
    try:
        return from_object(json.loads(data))
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        return None


def parse_json(body: bytes) -> Usage | None:
    """``usage`` of a whole (non-streaming) JSON response body."""
    return _decode(body)


class SseUsage:
    """Feed an SSE body chunk by chunk; :attr:`usage` is the last event's usage seen.

    Events may be split anywhere across chunks (also inside ``\\r\\n``); lines end with
    LF, CRLF or CR. Only the incomplete tail line and the current event's ``data`` lines
    are kept, each capped at ``max_line_bytes``. ``data: [DONE]`` and events without (or
    with a null) ``usage`` leave the last usage in place.
    """

    def __init__(self, *, max_line_bytes: int = MAX_SSE_LINE_BYTES) -> None:
        self._max = max_line_bytes
        self._tail: list[bytes] = []  # parts of the incomplete last line
        self._tail_bytes = 0
        self._skipping = False  # inside an over-long line: drop bytes until its end
        self._data: list[bytes] = []  # data lines of the current event
        self._data_bytes = 0
        self._event_too_long = False
        self._usage: Usage | None = None

    @property
    def usage(self) -> Usage | None:
        """The last usage seen, counting an event the stream ended without closing."""
        if self._event_too_long or self._skipping:
            return self._usage
        pending = list(self._data)
        tail = _data_field(b"".join(self._tail).rstrip(b"\r"))
        if tail is not None:
            pending.append(tail)
        found = _decode(b"\n".join(pending)) if pending else None
        return self._usage if found is None else found

    def feed(self, chunk: bytes) -> None:
        if not chunk:
            return
        pending_cr = bool(self._tail) and self._tail[-1].endswith(b"\r")
        if b"\n" not in chunk and b"\r" not in chunk and not pending_cr:
            self._extend_tail(chunk)  # no line ends: no join, no copy of the tail
            return
        self._tail.append(chunk)
        buf = b"".join(self._tail)
        # Hold back a final CR: with the next chunk's LF it is one line end, not two.
        hold = buf.endswith(b"\r")
        if hold:
            buf = buf[:-1]
        lines = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        rest = lines.pop()
        self._tail, self._tail_bytes = [], 0
        for line in lines:
            if self._skipping:
                self._skipping = False  # the end of the over-long line
            else:
                self._line(line)
        self._extend_tail(rest + b"\r" if hold else rest)

    def _extend_tail(self, part: bytes) -> None:
        if self._skipping or not part:
            return
        self._tail.append(part)
        self._tail_bytes += len(part)
        if self._tail_bytes > self._max:
            self._tail, self._tail_bytes = [], 0
            self._skipping = True
            self._event_too_long = True

    def _line(self, line: bytes) -> None:
        if not line:
            self._dispatch()
            return
        data = _data_field(line)
        if data is None or self._event_too_long:
            return  # other fields (event:, id:, retry:) and comments carry no usage
        self._data_bytes += len(data)
        if self._data_bytes > self._max:
            self._event_too_long = True
            self._data = []
        else:
            self._data.append(data)

    def _dispatch(self) -> None:
        if self._data and not self._event_too_long:
            found = _decode(b"\n".join(self._data))
            if found is not None:
                self._usage = found
        self._data, self._data_bytes = [], 0
        self._event_too_long = False


def _data_field(line: bytes) -> bytes | None:
    """The value of an SSE ``data:`` line (one optional leading space removed)."""
    if not line.startswith(b"data:"):
        return None
    return line[6:] if line.startswith(b"data: ") else line[5:]
