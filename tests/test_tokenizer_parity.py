"""``PromptTokenizer`` against ``transformers`` itself (test-only dependency), offline.

Each case loads ONE model directory with both ``PromptTokenizer.load`` and
``transformers.AutoTokenizer.from_pretrained(local_files_only=True)`` and compares the
rendered chat text (``apply_chat_template(..., tokenize=False)``) and the token ids
(``tokenizer(text, add_special_tokens=...)``) over a corpus of chats and completion
prompts. Models: the Qwen byte-level BPE (``make tokenizer``), the committed tiny
tokenizer, the Qwen tokenizer with a Qwen2.5-style tools template (``tojson``), and the
tiny tokenizer with a BOS post-processor and a template using every global and filter.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from inference_cache.tokenizer import PromptTokenizer, TemplateError, vllm_conversation

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "data" / "tiny-tokenizer"
QWEN = REPO / ".cache" / "tokenizers" / "qwen"

Chat = list[dict[str, Any]]

#: Qwen2.5's tool-calling template (as published on the Hub), exercising ``tojson``.
QWEN25_TEMPLATE = (
    "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n    {%- endif %}\n"  # noqa: E501
    '    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n'
    'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}\n'
    '    {%- for tool in tools %}\n        {{- "\\n" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n'
    '    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments '
    'within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": '
    '<args-json-object>}\\n</tool_call><|im_end|>\\n" }}\n'
    "{%- else %}\n    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n"
    "{%- for message in messages %}\n"
    '    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or '
    '(message.role == "assistant" and not message.tool_calls) %}\n'
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n            {{- '\\n' + message.content }}\n        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n"
    "            {%- if tool_call.function is defined %}\n                {%- set tool_call = tool_call.function %}\n"  # noqa: E501
    '            {%- endif %}\n            {{- \'\\n<tool_call>\\n{"name": "\' }}\n            {{- tool_call.name }}\n'  # noqa: E501
    '            {{- \'", "arguments": \' }}\n            {{- tool_call.arguments | tojson }}\n'
    "            {{- '}\\n</tool_call>' }}\n        {%- endfor %}\n        {{- '<|im_end|>\\n' }}\n"
    '    {%- elif message.role == "tool" %}\n'
    '        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}\n'
    "            {{- '<|im_start|>user' }}\n        {%- endif %}\n        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n        {{- '\\n</tool_response>' }}\n"
    '        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}\n'
    "            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n"
)

#: Every global, filter option and variable transformers provides; time-independent output.
FEATURES_TEMPLATE = """{{ bos_token }}{% set ns = namespace(n=0) %}
{% for m in messages %}
  {% if m.role == 'skip' %}{% continue %}{% endif %}
  {% set ns.n = ns.n + 1 %}
  <{{ m.role }}>{{ m.content | trim }}{% if m.reasoning_content %} (thought: {{ m.thinking }}){% endif %}
  {% generation %}{{ eos_token }}{% endgeneration %}
  {% if ns.n > 50 %}{% break %}{% endif %}
{% endfor %}
{% if tools %}{{ tools | tojson(indent=2, sort_keys=True) }}
{{ tools | tojson(separators=(',', ':')) }}{% endif %}
{% if documents %}{% for d in documents %}[{{ d.title }}: {{ d.text }}]{% endfor %}{% endif %}
{{ dict(a=1, b='é') | tojson }}{{ dict.fromkeys(['x']) | tojson(ensure_ascii=True) }}
year digits: {{ strftime_now('%Y') | length }} {{ custom_flag | default('unset') }}
{% if messages | length > 1000 %}{{ raise_exception('too long') }}{% endif %}
{% if add_generation_prompt %}<assistant>{% endif %}"""


def _write_model(directory: Path, tokenizer: dict[str, Any], config: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.json").write_text(json.dumps(tokenizer))
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def _qwen() -> Path:
    if not (QWEN / "tokenizer.json").exists():
        pytest.skip("the Qwen tokenizer is built by `make tokenizer`")
    return QWEN


def _qwen_tools(tmp: Path) -> Path:
    source = _qwen()
    tokenizer = json.loads((source / "tokenizer.json").read_text())
    next_id = max(t["id"] for t in tokenizer["added_tokens"]) + 1
    for i, content in enumerate(["<tool_call>", "</tool_call>"]):  # Qwen2.5's non-special added tokens
        tokenizer["added_tokens"].append(
            {
                "id": next_id + i,
                "content": content,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": False,
            }
        )
    config = json.loads((source / "tokenizer_config.json").read_text())
    return _write_model(tmp / "qwen-tools", tokenizer, {**config, "chat_template": QWEN25_TEMPLATE})


def _tiny_bos(tmp: Path) -> Path:
    tokenizer = json.loads((TINY / "tokenizer.json").read_text())
    tokenizer["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [
            {"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
        ],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [0], "tokens": ["<|endoftext|>"]}},
    }
    config = json.loads((TINY / "tokenizer_config.json").read_text())
    config |= {"bos_token": "<|endoftext|>", "chat_template": FEATURES_TEMPLATE}
    return _write_model(tmp / "tiny-bos", tokenizer, config)


MODELS: dict[str, Callable[[Path], Path]] = {
    "qwen": lambda _: _qwen(),
    "tiny": lambda _: TINY,
    "qwen-tools": _qwen_tools,
    "tiny-bos": _tiny_bos,
}

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Météo — weather for a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
                "required": ["city"],
            },
        },
    }
]
TOOL_CALL = {
    "id": "c1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Zürich"}'},
}

#: (OpenAI messages, render options); messages go through ``vllm_conversation`` first.
CHATS: list[tuple[Chat, dict[str, Any]]] = [
    ([{"role": "user", "content": "Hello!"}], {}),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"}], {}),
    (
        [
            {"role": "system", "content": "You are a pirate."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Arr, hello!"},
            {"role": "user", "content": "  spaces  and\ttabs\n\nand newlines  "},
        ],
        {},
    ),
    ([{"role": "user", "content": "日本語のテキスト 🚀 émojis, Ελληνικά, עברית, \u200b zero-width"}], {}),
    ([{"role": "user", "content": "<|im_start|>inline special tokens<|im_end|> in user text"}], {}),
    (
        [
            {
                "role": "user",
                "content": [{"type": "text", "text": "part one"}, {"type": "text", "text": "part two"}],
            }
        ],
        {},
    ),
    (
        [{"role": "user", "content": "Write a haiku"}, {"role": "assistant", "content": "Autumn moonlight"}],
        {"add_generation_prompt": False, "continue_final_message": True},
    ),
    (
        [{"role": "user", "content": "closed turn"}, {"role": "assistant", "content": "ok"}],
        {"add_generation_prompt": False},
    ),
    (
        [
            {"role": "user", "content": "Weather in Zürich?"},
            {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]},
            {"role": "tool", "content": '{"temp": 21}', "tool_call_id": "c1"},
            {"role": "tool", "content": '{"temp": 22}', "tool_call_id": "c1"},
        ],
        {"tools": TOOLS},
    ),
    ([{"role": "user", "content": "use a tool"}], {"tools": TOOLS}),
    (
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning_content": "hmm"}],
        {"documents": [{"title": "Doc", "text": "Body"}], "chat_template_kwargs": {"custom_flag": "on"}},
    ),
    ([{"role": "user", "content": "x" * 3000 + " end"}], {}),
]

COMPLETIONS = [
    "",
    "The quick brown fox",
    " leading space",
    "trailing space ",
    "<|endoftext|>document boundary<|endoftext|>",
    "naïve café – 🚀🚀 ü\u0308",  # NFC normalizer on Qwen
    "def f(x):\n    return x * 2\n\n\n",
    "1234567890 3.14159 ١٢٣",
]


def _hf(path: Path) -> Any:
    os.environ["HF_HUB_OFFLINE"] = "1"
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def _hf_render(hf: Any, conversation: Chat, options: dict[str, Any]) -> str:
    kwargs = dict(options.get("chat_template_kwargs") or {})
    rendered: str = hf.apply_chat_template(
        conversation,
        tools=options.get("tools"),
        documents=options.get("documents"),
        add_generation_prompt=options.get("add_generation_prompt", True),
        continue_final_message=options.get("continue_final_message", False),
        tokenize=False,
        **kwargs,
    )
    return rendered


@pytest.mark.parametrize("model", list(MODELS))
def test_chat_parity(model: str, tmp_path: Path) -> None:
    path = MODELS[model](tmp_path)
    ours, hf = PromptTokenizer.load(path), _hf(path)
    compared = 0
    for messages, options in CHATS:
        conversation = vllm_conversation(messages, ours.content_format(tools=options.get("tools")))
        try:
            expected = _hf_render(hf, conversation, options)
        except Exception as e:  # the template refuses it: we must refuse it too
            with pytest.raises(TemplateError):
                ours.render_chat(conversation, **options)
            assert not isinstance(e, AssertionError)
            continue
        text = ours.render_chat(conversation, **options)
        assert text == expected, (model, messages)
        for special in (False, True):
            assert (
                ours.encode(text, add_special_tokens=special)
                == hf(text, add_special_tokens=special)["input_ids"]
            )
        assert (
            ours.encode_chat(conversation, **options) == hf(expected, add_special_tokens=False)["input_ids"]
        )
        compared += 1
    assert compared >= len(CHATS) - 2


@pytest.mark.parametrize("model", list(MODELS))
def test_completion_parity(model: str, tmp_path: Path) -> None:
    path = MODELS[model](tmp_path)
    ours, hf = PromptTokenizer.load(path), _hf(path)
    for prompt in COMPLETIONS:
        for special in (True, False):
            assert (
                ours.encode(prompt, add_special_tokens=special)
                == hf(prompt, add_special_tokens=special)["input_ids"]
            ), (model, prompt, special)


def test_bos_is_added_for_completions_only(tmp_path: Path) -> None:
    tok = PromptTokenizer.load(_tiny_bos(tmp_path))
    assert tok.encode("hi")[0] == 0
    assert tok.encode("hi", add_special_tokens=False)[0] != 0
    ids = tok.encode_chat([{"role": "user", "content": "hi"}])
    assert ids[0] == 0 and ids[1] != 0  # the template's BOS only, no second one
    assert tok.encode_chat([{"role": "user", "content": "hi"}], add_special_tokens=True)[:2] == [0, 0]


def test_raise_exception_parity(tmp_path: Path) -> None:
    path = _tiny_bos(tmp_path)
    ours, hf = PromptTokenizer.load(path), _hf(path)
    chat = [{"role": "user", "content": "x"}] * 1001
    with pytest.raises(Exception, match="too long"):
        hf.apply_chat_template(chat, tokenize=False)
    with pytest.raises(TemplateError, match="too long"):
        ours.render_chat(chat)
