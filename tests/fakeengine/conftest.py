"""Shared paths for the fake-engine tests: the vLLM samples in ``shared/data/kv-events``
(beside the clone) and the committed tiny tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
KV_EVENTS = REPO.parent / "shared" / "data" / "kv-events"
TINY_TOKENIZER = REPO / "tests" / "data" / "tiny-tokenizer"


@pytest.fixture
def kv_events_dir() -> Path:
    if not KV_EVENTS.is_dir():
        pytest.fail(f"shared vLLM samples missing: {KV_EVENTS}")
    return KV_EVENTS
