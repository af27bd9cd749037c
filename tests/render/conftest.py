"""Fixtures of the prompt-template tests: the real tokenizers the boundary is checked on
(the Qwen BPE built by ``make tokenizer``, skipped when absent, and the tiny test one).
Nothing is faked: rendering, tokenizing and keying are the production code."""

from __future__ import annotations

from pathlib import Path

import pytest

from inference_cache.tokenizer import PromptTokenizer

REPO = Path(__file__).resolve().parents[2]
TOKENIZERS = {
    "qwen": REPO / ".cache" / "tokenizers" / "qwen",
    "tiny": REPO / "tests" / "data" / "tiny-tokenizer",
}


def load(name: str) -> PromptTokenizer:
    path = TOKENIZERS[name]
    if not (path / "tokenizer.json").exists():
        pytest.skip("the Qwen tokenizer is built by `make tokenizer`")
    return PromptTokenizer.load(path)


@pytest.fixture(params=sorted(TOKENIZERS), scope="module")
def tokenizer(request: pytest.FixtureRequest) -> PromptTokenizer:
    return load(request.param)


@pytest.fixture(scope="module")
def qwen() -> PromptTokenizer:
    return load("qwen")
