"""Shared paths for the fake-engine tests: the vLLM samples in ``shared/data/kv-events``
(beside the clone) and the committed tiny tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import vllm_samples

REPO = Path(__file__).resolve().parents[2]
TINY_TOKENIZER = REPO / "tests" / "data" / "tiny-tokenizer"


@pytest.fixture
def kv_events_dir() -> Path:
    return vllm_samples.kv_events_dir()
