"""End to end with ``matching: bytes`` (issue #9): a real Envoy, our server, fake vLLM engines.

The model is matched by the rendered prompt's bytes against the engines' block bytes (the
token ids of their KV events), without tokenizing the request. The engine that answers a
follow-up confirms the prediction with its own ``cached_tokens``. The fleet
(``start_fleet``) lives in ``conftest.py``.
"""

from __future__ import annotations

from .conftest import BS, MODEL, StartFleet, conversation


async def test_a_follow_up_lands_on_its_cache_and_the_engine_confirms_the_byte_match(
    start_fleet: StartFleet,
) -> None:
    fleet = await start_fleet("buffered", matching="bytes")
    server = fleet.servers[0]
    assert server.picker.routes[MODEL].bytes is not None, "byte matching is off"
    firsts = {}
    for i in range(3):
        reply = await fleet.chat(conversation(i))
        assert reply.status == 200, reply.body
        firsts[i] = reply
    await fleet.sync()
    for i, first in firsts.items():
        follow = await fleet.chat(conversation(i, turns=2))
        assert follow.status == 200, follow.body
        assert follow.decision is not None
        assert follow.decision["match"] == "bytes"
        predicted = follow.decision["ranked"][0]
        assert predicted["endpoint"] == follow.engine == first.engine, f"conversation {i} left its cache"
        assert follow.cached_tokens == predicted["matched_tokens"] == (first.prompt_tokens // BS) * BS > 0
