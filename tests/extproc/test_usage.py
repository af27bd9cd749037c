"""``usage`` from OpenAI responses: whole JSON bodies and SSE streams fed in arbitrary
chunks (``inference_cache.extproc.usage``). Pure functions, no I/O."""

from __future__ import annotations

import json

import pytest

from inference_cache.extproc import usage
from inference_cache.extproc.picking import Usage

FULL = {"prompt_tokens": 120, "completion_tokens": 7, "prompt_tokens_details": {"cached_tokens": 96}}


def event(obj: object) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def chat_stream(*, final_usage: object = FULL, crlf: bool = False) -> bytes:
    """A vLLM-like chat stream: content chunks with ``usage: null``, a final usage chunk."""
    chunks = [
        event({"id": "c", "choices": [{"delta": {"content": "Hel"}}], "usage": None}),
        b": keep-alive comment\n\n",
        event({"id": "c", "choices": [{"delta": {"content": "lo"}}], "usage": None}),
        b"event: message\nid: 7\n" + event({"id": "c", "choices": [], "usage": final_usage}),
        b"data: [DONE]\n\n",
    ]
    stream = b"".join(chunks)
    return stream.replace(b"\n", b"\r\n") if crlf else stream


def feed_all(parser: usage.SseUsage, stream: bytes, size: int) -> None:
    for start in range(0, len(stream), size):
        parser.feed(stream[start : start + size])


# --- parse_json -----------------------------------------------------------------------


def test_json_usage_with_cached_tokens() -> None:
    body = json.dumps({"id": "x", "choices": [{"text": "hi"}], "usage": FULL}).encode()
    assert usage.parse_json(body) == Usage(prompt_tokens=120, completion_tokens=7, cached_tokens=96)


def test_json_usage_without_details() -> None:
    body = json.dumps({"usage": {"prompt_tokens": 5, "completion_tokens": 1}}).encode()
    assert usage.parse_json(body) == Usage(prompt_tokens=5, completion_tokens=1, cached_tokens=None)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b'not json, but mentions "usage"', id="garbage"),
        pytest.param(b'\xff\xfe"usage"', id="invalid-utf8"),
        pytest.param(b'["usage"]', id="not-an-object"),
        pytest.param(b'{"usage": null}', id="null-usage"),
        pytest.param(b'{"usage": "lots"}', id="usage-not-object"),
        pytest.param(b'{"usage": {"total_tokens": 3}}', id="no-known-counts"),
        pytest.param(b'{"choices": []}', id="absent"),
        pytest.param(b'{"usage": {"prompt_tokens": 1', id="truncated"),
    ],
)
def test_json_without_usable_usage_is_none(body: bytes) -> None:
    assert usage.parse_json(body) is None


def test_json_counts_must_be_non_negative_integers() -> None:
    body = json.dumps(
        {
            "usage": {
                "prompt_tokens": True,
                "completion_tokens": -1,
                "prompt_tokens_details": {"cached_tokens": "3"},
                "total_tokens": 9,
            }
        }
    ).encode()
    assert usage.parse_json(body) is None
    body = json.dumps({"usage": {"prompt_tokens": 4, "prompt_tokens_details": None}}).encode()
    assert usage.parse_json(body) == Usage(prompt_tokens=4)


# --- SSE ------------------------------------------------------------------------------


@pytest.mark.parametrize("crlf", [False, True], ids=["lf", "crlf"])
@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, 1 << 20], ids=lambda n: f"chunk{n}")
def test_sse_final_usage_event_split_anywhere(size: int, crlf: bool) -> None:
    parser = usage.SseUsage()
    feed_all(parser, chat_stream(crlf=crlf), size)
    assert parser.usage == Usage(prompt_tokens=120, completion_tokens=7, cached_tokens=96)


def test_sse_cr_only_line_ends() -> None:
    parser = usage.SseUsage()
    feed_all(parser, chat_stream().replace(b"\n", b"\r"), 5)
    assert parser.usage == Usage(prompt_tokens=120, completion_tokens=7, cached_tokens=96)


def test_sse_last_usage_event_wins_and_null_does_not_erase() -> None:
    stream = (
        event({"choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": 1}})
        + event({"choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": 2}})
        + event({"choices": [], "usage": None})
        + b"data: [DONE]\n\n"
    )
    parser = usage.SseUsage()
    feed_all(parser, stream, 11)
    assert parser.usage == Usage(prompt_tokens=10, completion_tokens=2)


def test_sse_without_usage_is_none() -> None:
    parser = usage.SseUsage()
    feed_all(parser, chat_stream(final_usage=None), 9)
    assert parser.usage is None


def test_sse_unterminated_last_event_counts() -> None:
    parser = usage.SseUsage()
    parser.feed(b'data: {"usage": {"prompt_tokens": 3}}')
    assert parser.usage == Usage(prompt_tokens=3)
    parser.feed(b"\n")
    assert parser.usage == Usage(prompt_tokens=3)


@pytest.mark.parametrize("size", [1, 1 << 10], ids=lambda n: f"chunk{n}")
@pytest.mark.parametrize("end", [b"\n", b"\r\n"], ids=["lf", "crlf"])
def test_sse_multi_line_data_event(end: bytes, size: int) -> None:
    # A CRLF split between its CR and LF is one line end: the event is not cut in two.
    parser = usage.SseUsage()
    feed_all(parser, b'data: {"usage":' + end + b'data: {"prompt_tokens": 8}}' + end + end, size)
    assert parser.usage == Usage(prompt_tokens=8)


def test_sse_garbage_never_raises() -> None:
    parser = usage.SseUsage()
    for chunk in (b"\xff\xfe\n\n", b'data: {"usage": [1,2]}\n\n', b"data:\n\n", b"\r", b"\r\n", b"::\n"):
        parser.feed(chunk)
    assert parser.usage is None


def test_sse_over_long_line_is_skipped_with_bounded_memory() -> None:
    parser = usage.SseUsage(max_line_bytes=100)
    parser.feed(b'data: {"usage": {"prompt_tokens": 1}}\n\n')
    # An over-long event (split in many chunks, no line end yet): nothing kept beyond the cap.
    parser.feed(b'data: {"usage": {"prompt_tokens": 2}, "pad": "')
    for _ in range(50):
        parser.feed(b"x" * 40)
        assert parser._tail_bytes <= 100
    parser.feed(b'"}\n\n')
    assert parser.usage == Usage(prompt_tokens=1)  # the over-long event is not half-read
    parser.feed(b'data: {"usage": {"prompt_tokens": 3}}\n\n')
    assert parser.usage == Usage(prompt_tokens=3)


def test_sse_over_long_multi_line_event_is_dropped() -> None:
    parser = usage.SseUsage(max_line_bytes=100)
    parser.feed(b'data: {"usage": {"prompt_tokens": 4},\n' + (b"data: " + b"y" * 60 + b"\n") * 3 + b"\n")
    assert parser.usage is None
    parser.feed(b'data: {"usage": {"prompt_tokens": 5}}\n\n')
    assert parser.usage == Usage(prompt_tokens=5)
