"""The docker-compose demo's client: a few chats through Envoy, and where each one went.

Owner: ``examples/envoy/`` (the ``client`` service of ``docker-compose.yml``; ``tests/compose/``
runs it on loopback against a real Envoy). Python standard library only, so it runs in our
image and in any Python 3.11.

Each conversation has a long system prompt of its own. The client sends every conversation's
first turn, then every conversation's second turn (the first turn, the engine's answer and a
new question). It prints one line per request: the engine that answered (the fake engine's
``x-engine-address`` header) and the prompt and cached tokens the engine reports in
``usage``. With cache-aware routing each second turn lands on the engine that served its
first turn and finds the conversation's prefix cached there. The last line is the verdict;
the exit code is 0 when every request succeeded, every follow-up landed on its first turn's
engine and found cached tokens, 1 otherwise (2 when Envoy never became routable).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

ENGINE_HEADER = "x-engine-address"
SYSTEM = (
    "[{team}] You are a meticulous assistant for the {team} team. Follow the house style, cite "
    "the runbook section you rely on, and never invent numbers. Context for this conversation: {topic}."
)


@dataclass(frozen=True)
class Answer:
    status: int
    engine: str
    prompt_tokens: int
    cached_tokens: int
    content: str


def system_prompt(i: int) -> str:
    """A long system prompt unique to conversation ``i`` (a cold prefix of its own)."""
    return SYSTEM.format(team=f"team-{i}", topic=" ".join(f"fact-{i}-{k}" for k in range(60)))


def post_chat(url: str, model: str, messages: list[dict[str, str]], timeout_s: float) -> Answer:
    body = json.dumps({"model": model, "messages": messages, "max_tokens": 8}).encode()
    request = urllib.request.Request(
        f"{url}/v1/chat/completions", data=body, headers={"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            status, headers, raw = response.status, response.headers, response.read()
    except urllib.error.HTTPError as e:
        status, headers, raw = e.code, e.headers, e.read()
    try:
        data: dict[str, Any] = json.loads(raw)
    except ValueError:
        data = {}
    usage = data.get("usage") or {}
    choices = data.get("choices") or [{}]
    return Answer(
        status=status,
        engine=headers.get(ENGINE_HEADER, "?"),
        prompt_tokens=int(usage.get("prompt_tokens", 0)),
        cached_tokens=int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0),
        content=str((choices[0].get("message") or {}).get("content", "")),
    )


def wait_routable(url: str, timeout_s: float) -> bool:
    """Until a request through Envoy reaches an engine (``GET /v1/models`` answers 200)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{url}/v1/models", timeout=5) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)


def show(conversation: int, turn: int, answer: Answer) -> None:
    print(
        f"conversation {conversation} turn {turn}: engine {answer.engine} status {answer.status} "
        f"prompt_tokens {answer.prompt_tokens} cached_tokens {answer.cached_tokens}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://envoy:10000", help="Envoy's listener")
    parser.add_argument("--model", default="demo-model")
    parser.add_argument("--conversations", type=int, default=4)
    parser.add_argument("--wait-s", type=float, default=60.0, help="how long to wait for Envoy")
    parser.add_argument("--timeout-s", type=float, default=30.0, help="per request")
    args = parser.parse_args(argv)
    url = args.url.rstrip("/")
    print(f"client: {args.conversations} conversations through {url} (model {args.model})", flush=True)
    if not wait_routable(url, args.wait_s):
        print(f"FAIL: {url} did not route a request within {args.wait_s}s", flush=True)
        return 2
    chats: dict[int, list[dict[str, str]]] = {}
    first: dict[int, Answer] = {}
    for i in range(1, args.conversations + 1):
        chats[i] = [
            {"role": "system", "content": system_prompt(i)},
            {"role": "user", "content": f"What is the first step for item {i}?"},
        ]
        first[i] = post_chat(url, args.model, chats[i], args.timeout_s)
        show(i, 1, first[i])
    failed = sum(a.status != 200 for a in first.values())
    landed = cached = 0
    for i in range(1, args.conversations + 1):
        chats[i] += [
            {"role": "assistant", "content": first[i].content},
            {"role": "user", "content": f"And the second step for item {i}?"},
        ]
        answer = post_chat(url, args.model, chats[i], args.timeout_s)
        show(i, 2, answer)
        failed += answer.status != 200
        if answer.status == 200 and answer.engine == first[i].engine and answer.cached_tokens > 0:
            landed += 1
        cached += answer.cached_tokens
    ok = failed == 0 and landed == args.conversations
    print(
        f"{'OK' if ok else 'FAIL'}: {2 * args.conversations - failed}/{2 * args.conversations} requests "
        f"answered, {landed}/{args.conversations} follow-ups on their first turn's engine with "
        f"cached tokens, {cached} cached tokens on follow-ups",
        flush=True,
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
