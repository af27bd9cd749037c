"""Regenerate the tiny test tokenizer: ``python tests/data/tiny-tokenizer/build.py``.

A byte-level BPE (vocab 512) trained with ``tokenizers`` on the text below, plus a
``tokenizer_config.json`` with a ChatML chat template and the special tokens
``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>`` (ids 0, 1, 2). Used by the fake-engine
tests instead of a real model's tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

HERE = Path(__file__).resolve().parent
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TEXT = """
A prefix cache keeps the key and value tensors of tokens that an engine has already seen.
When a new request starts with the same tokens, the engine can skip the prefill of those
tokens and start decoding sooner. The router reads the events the engine publishes and
sends each request to the replica that holds the longest matching prefix of its prompt.
You are a helpful assistant. Answer the question briefly and truthfully.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
How vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow.
Blocks are sixteen tokens long. Only full blocks are hashed; the partial tail never is.
Each block hash is chained on the hash of the block before it, so equal hashes mean equal
prefixes. When the cache is full, the least recently used free block is evicted first.
System prompts, tool descriptions and long documents are shared across many requests.
The scheduler admits requests in order while there is room, and the rest wait in a queue.
Time to first token grows with the number of uncached prompt tokens.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 32 64 128 256 512 1024 2048 4096.
Punctuation: ( ) [ ] { } < > , . ; : ! ? ' " - _ + = * / \\ | @ # $ % ^ & ~ `
"""


def build() -> None:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([TEXT] * 4, trainer=trainer)
    tokenizer.save(str(HERE / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 4096,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "additional_special_tokens": SPECIAL[1:],
        "chat_template": CHAT_TEMPLATE,
    }
    (HERE / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


if __name__ == "__main__":
    build()
