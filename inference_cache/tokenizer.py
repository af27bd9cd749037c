"""Prompts to token ids exactly as vLLM's OpenAI server makes them.

Owner: ``inference_cache`` (root package). Two users: the fake engine (``fakeengine.app``
turns every request into token ids here) and the router's request path (``extproc.picker``
tokenizes a parsed request here before ``index.fingerprint.chain_keys`` keys its blocks). A
key only matches what the engine cached if these ids equal the engine's, so this module
copies the behaviour it depends on rather than approximating it:

* **Tokenizing** is Hugging Face ``tokenizers`` on the model's ``tokenizer.json``, as the
  fast tokenizer in ``transformers`` runs it (no truncation, no padding). vLLM's rules:
  a rendered chat is encoded with ``add_special_tokens=False`` (the template wrote them)
  unless the request says otherwise; completion prompts with ``add_special_tokens=True``,
  so the post-processor adds a BOS where the model has one.
* **Chat templates** render in the Jinja environment of ``transformers``
  (``utils/chat_template_utils.py``, 5.x): ``ImmutableSandboxedEnvironment`` with
  ``trim_blocks``, ``lstrip_blocks`` and ``loopcontrols``; globals ``raise_exception``,
  ``strftime_now``, a limited ``dict`` and a ``namespace`` refusing ``_`` names; ``tojson``
  with ``ensure_ascii=False, indent, separators, sort_keys``. The template sees
  ``messages`` (``None`` values dropped, reasoning aliased), ``tools``, ``documents``,
  ``add_generation_prompt``, the named special tokens that are set (``bos_token``,
  ``eos_token``, ``unk_token``, ``sep_token``, ``pad_token``, ``cls_token``, ``mask_token``
  and model-specific ``*_token`` entries; transformers 5 no longer passes
  ``additional_special_tokens``) and ``chat_template_kwargs``, which win over all of
  these as in vLLM. ``continue_final_message`` cuts the rendering after the final message
  the way transformers does. Named templates pick ``tool_use`` when tools are given, else
  ``default``; ``chat_template.jinja`` beside the config wins over the config's entry.
* **OpenAI messages to a template conversation** (``vllm_conversation``) follows vLLM's
  ``parse_chat_messages``: text parts joined by newlines for templates that print
  ``content`` as a string, kept as ``{"type": "text"}`` parts for templates that loop
  over it (vLLM's ``auto`` content-format detection), tool-call arguments parsed from
  JSON strings, ``name``/``tool_call_id``/reasoning kept.
* **Multi-turn prefix cache** (``CachedChatEncoder``): a follow-up turn re-renders the
  whole chat but tokenizes only the text after the longest previously seen prefix. The
  split is exact (see ``_SplitFinder``): ``tokenizers`` cuts the text at added tokens
  before normalizing and pre-tokenizing, so the text on either side of such a cut
  tokenizes independently.

``transformers`` itself is a test-only dependency (``tests/test_tokenizer_parity.py``).
"""

from __future__ import annotations

import array
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import jinja2.utils
import xxhash
from tokenizers import Tokenizer

ContentFormat = Literal["string", "openai"]

#: The named special tokens transformers 5 passes to templates (``SPECIAL_TOKENS_ATTRIBUTES``).
SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
#: transformers aliases a message's reasoning under these names (the first is standard).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


#: Texts longer than this are tokenized with the GIL released (``PromptTokenizer.encode``).
GIL_RELEASE_CHARS = 4096


class TemplateError(ValueError):
    """The chat template (or the conversation given to it) cannot be rendered."""


# --- the Jinja environment of transformers ------------------------------------------------


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _TemplateDict:
    """``dict`` for templates without attribute access to the real type."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """``namespace`` refusing underscore attributes (no path to CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"templates cannot set underscore attributes ({name!r})")


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` renders its body (transformers tracks it
    for assistant masks, which we do not need)."""

    tags = {"generation"}  # noqa: RUF012 - Jinja's class attribute

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.CallBlock:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        block = jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body)
        block.set_lineno(lineno)
        return block

    def _body(self, caller: Callable[[], str]) -> str:
        return caller()


@lru_cache(maxsize=64)
def compile_template(source: str) -> jinja2.Template:
    """One compiled template per source text, in the environment transformers uses."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise TemplateError(f"the chat template does not compile: {e}") from e


@lru_cache(maxsize=64)
def detect_content_format(source: str) -> ContentFormat:
    """vLLM's ``auto`` content format: ``openai`` when the template loops over a message's
    ``content`` (``for part in message['content']`` or ``for part in content``), else
    ``string``."""
    try:
        ast = compile_template(source).environment.parse(source)
    except (TemplateError, jinja2.TemplateError):
        return "string"
    messages_vars = {"messages"} | {
        n.target.name
        for n in ast.find_all(jinja2.nodes.Assign)
        if isinstance(n.target, jinja2.nodes.Name) and _accesses(n.node, {"messages"})
    }
    message_vars = {
        loop.target.name
        for loop in ast.find_all(jinja2.nodes.For)
        if isinstance(loop.target, jinja2.nodes.Name) and _accesses(loop.iter, messages_vars)
    }
    for loop in ast.find_all(jinja2.nodes.For):
        it = loop.iter
        if isinstance(it, jinja2.nodes.Name) and it.name == "content":
            return "openai"
        if _accesses(it, message_vars, "content"):
            return "openai"
    return "string"


def _accesses(node: jinja2.nodes.Node, names: set[str], key: str | None = None) -> bool:
    """``node`` is ``name``, ``name[...]`` / ``name.x`` (any depth), or ``name[key]``/``name.key``."""
    if key is not None:
        if isinstance(node, jinja2.nodes.Getitem) and isinstance(node.arg, jinja2.nodes.Const):
            return node.arg.value == key and _accesses(node.node, names)
        if isinstance(node, jinja2.nodes.Getattr):
            return node.attr == key and _accesses(node.node, names)
        return False
    if isinstance(node, jinja2.nodes.Name):
        return node.name in names
    if isinstance(node, (jinja2.nodes.Getitem, jinja2.nodes.Getattr)):
        return _accesses(node.node, names)
    if isinstance(node, jinja2.nodes.Filter) and node.node is not None:  # messages | reverse
        return _accesses(node.node, names)
    return False


# --- OpenAI messages -> the conversation vLLM gives the template -----------------------------


def vllm_conversation(
    messages: Sequence[Mapping[str, Any]], content_format: ContentFormat = "string"
) -> list[dict[str, Any]]:
    """OpenAI chat messages as vLLM's ``parse_chat_messages`` hands them to the template.

    Text parts (and plain string parts) are joined with ``"\\n"`` for ``string`` templates
    or kept as text parts for ``openai`` ones; a missing content is ``""``. Non-text parts
    (images, audio) make the engine insert placeholder tokens we cannot reproduce, so they
    raise ``TemplateError``."""
    out: list[dict[str, Any]] = []
    for message in messages:
        role = message.get("role")
        if not isinstance(role, str):
            raise TemplateError("every message needs a string role")
        content = message.get("content")
        parts: list[Any] = [] if content is None else [content] if isinstance(content, str) else list(content)
        texts: list[str] = []
        for part in parts:
            if isinstance(part, str):
                texts.append(part)
            elif (
                isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str)
            ):
                texts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise TemplateError(f"content part {kind!r} is not supported (text only)")
        converted: dict[str, Any] = {"role": role}
        if content_format == "openai":
            converted["content"] = [{"type": "text", "text": t} for t in texts]
        else:
            converted["content"] = "\n".join(texts)
        if role == "assistant":
            if message.get("tool_calls") is not None:
                converted["tool_calls"] = [_parse_arguments(c) for c in message["tool_calls"]]
            reasoning = message.get("reasoning") or message.get("reasoning_content")
            if reasoning is not None:
                converted["reasoning"] = reasoning
                converted["reasoning_content"] = reasoning
        elif role == "tool" and "tool_call_id" in message:
            converted["tool_call_id"] = message["tool_call_id"]
        if isinstance(message.get("name"), str):
            converted["name"] = message["name"]
        out.append(converted)
    return out


def _parse_arguments(call: Any) -> Any:
    """Tool-call ``arguments`` as a dict (vLLM's ``_postprocess_messages``): templates
    expect them parsed; an empty or missing value is ``{}``."""
    if not isinstance(call, Mapping) or not isinstance(call.get("function"), Mapping):
        return call
    function = dict(call["function"])
    arguments = function.get("arguments")
    if not arguments:
        function["arguments"] = {}
    elif not isinstance(arguments, (dict, list)):
        try:
            function["arguments"] = json.loads(arguments)
        except (TypeError, ValueError) as e:
            raise TemplateError(f"tool call arguments are not JSON: {e}") from e
    return {**call, "function": function}


def vllm_chat_tokens(tok: PromptTokenizer, body: Mapping[str, Any]) -> list[int]:
    """The prompt token ids vLLM computes for an OpenAI chat request ``body``: its messages
    as ``vllm_conversation`` gives them to the chat template, rendered with the request's
    template options, tokenized with ``add_special_tokens`` false unless the request sets
    it. Raises ``TemplateError``."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise TemplateError("messages must be a list of objects")
    kwargs = body.get("chat_template_kwargs")
    return tok.encode_chat(
        vllm_conversation(messages, tok.content_format(tools=body.get("tools"))),
        add_special_tokens=bool(body.get("add_special_tokens", False)),
        add_generation_prompt=bool(body.get("add_generation_prompt", True)),
        continue_final_message=bool(body.get("continue_final_message", False)),
        tools=body.get("tools"),
        chat_template_kwargs=kwargs if isinstance(kwargs, dict) else None,
    )


# --- the tokenizer ----------------------------------------------------------------------------


def _token_str(value: Any) -> str | None:
    if isinstance(value, Mapping):  # AddedToken form
        content = value.get("content")
        return content if isinstance(content, str) else None
    return value if isinstance(value, str) else None


def _special_tokens(config: Mapping[str, Any]) -> dict[str, str]:
    """The named special tokens transformers 5 keeps in ``special_tokens_map`` (unset ones
    are left out, so templates see them undefined, not ``None``)."""
    names = [
        *SPECIAL_TOKEN_NAMES,
        *(k for k in config if k.endswith("_token") and k not in SPECIAL_TOKEN_NAMES),
    ]
    extra = config.get("extra_special_tokens")
    values: dict[str, Any] = {name: config.get(name) for name in names}
    if isinstance(extra, Mapping):
        values.update(extra)
    return {name: s for name, value in values.items() if (s := _token_str(value)) is not None}


def _load_templates(directory: Path, config: Mapping[str, Any]) -> dict[str, str]:
    files = {"default": directory / "chat_template.jinja"}
    extra_dir = directory / "additional_chat_templates"
    if extra_dir.is_dir():
        files |= {f.stem: f for f in sorted(extra_dir.glob("*.jinja"))}
    from_files = {name: f.read_text(encoding="utf-8") for name, f in files.items() if f.is_file()}
    if from_files:
        return from_files
    source = config.get("chat_template")
    if isinstance(source, str):
        return {"default": source}
    if isinstance(source, list):
        return {t["name"]: t["template"] for t in source if isinstance(t, Mapping)}
    return {}


@dataclass(frozen=True)
class PromptTokenizer:
    """A model's tokenizer and chat templates; stateless, safe to share between threads."""

    tokenizer: Tokenizer
    chat_templates: Mapping[str, str]
    """Template sources by name (``default``, ``tool_use``, ...)."""
    special_tokens: Mapping[str, str]
    """The named special tokens passed to templates (``eos_token`` -> ``<|im_end|>``)."""

    @classmethod
    def load(cls, path: Path, chat_template: Path | None = None) -> PromptTokenizer:
        """``path`` is a directory with ``tokenizer.json`` (+ ``tokenizer_config.json``,
        ``special_tokens_map.json``, ``chat_template.jinja``) or a ``tokenizer.json`` file;
        ``chat_template`` (a Jinja file) replaces the model's templates, as vLLM's
        ``--chat-template`` does."""
        file = path / "tokenizer.json" if path.is_dir() else path
        directory = file.parent
        config_file = directory / "tokenizer_config.json"
        config: dict[str, Any] = json.loads(config_file.read_text("utf-8")) if config_file.exists() else {}
        legacy_map = directory / "special_tokens_map.json"
        if "added_tokens_decoder" not in config and legacy_map.exists():  # as transformers does
            config.update(json.loads(legacy_map.read_text("utf-8")))
        templates = (
            {"default": chat_template.read_text("utf-8")}
            if chat_template
            else _load_templates(directory, config)
        )
        tokenizer = Tokenizer.from_file(str(file))
        tokenizer.no_truncation()  # transformers encodes without the file's truncation/padding
        tokenizer.no_padding()
        return cls(tokenizer, templates, _special_tokens(config))

    # -- plain text

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """``tokenizer(text, add_special_tokens=...)["input_ids"]`` of transformers.

        Long texts go through ``encode_batch``, which releases the GIL while it works
        (``encode`` holds it): a worker thread tokenizing a long prompt then leaves the
        event loop running, so the request path's deadline can fire (measured: the loop
        ran 45x more often beside a 1 s ``encode_batch`` than beside ``encode``; the batch
        call costs ~5% more, so short texts keep ``encode``)."""
        if len(text) > GIL_RELEASE_CHARS:
            (encoding,) = self.tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)
            batch_ids: list[int] = encoding.ids
            return batch_ids
        ids: list[int] = self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        text: str = self.tokenizer.decode(list(ids), skip_special_tokens=True)
        return text

    def token_strs(self, ids: Sequence[int]) -> list[str]:
        return [self.tokenizer.id_to_token(i) or "" for i in ids]

    @property
    def vocab_size(self) -> int:
        size: int = self.tokenizer.get_vocab_size(with_added_tokens=True)
        return size

    # -- chats

    def template_source(self, *, tools: object = None) -> str:
        """The template transformers' ``get_chat_template`` would pick."""
        if not self.chat_templates:
            raise TemplateError("the tokenizer has no chat template; pass --chat-template")
        if tools is not None and "tool_use" in self.chat_templates:
            return self.chat_templates["tool_use"]
        if "default" in self.chat_templates:
            return self.chat_templates["default"]
        raise TemplateError(f"several chat templates and no default: {sorted(self.chat_templates)}")

    def content_format(self, *, tools: object = None) -> ContentFormat:
        """How vLLM (``--chat-template-content-format auto``) passes content to this template."""
        return detect_content_format(self.template_source(tools=tools))

    def render_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> str:
        """``apply_chat_template(messages, tokenize=False, ...)`` of transformers on a
        template conversation (see ``vllm_conversation`` for OpenAI messages). The defaults
        are vLLM's request defaults; ``chat_template_kwargs`` override any of the keyword
        arguments, as vLLM merges them. Raises ``TemplateError``."""
        options: dict[str, Any] = {
            "add_generation_prompt": add_generation_prompt,
            "continue_final_message": continue_final_message,
            "tools": tools,
            "documents": documents,
        }
        variables = dict(chat_template_kwargs or {})
        for key in ("chat_template", "tokenize"):
            if key in variables:
                raise TemplateError(f"chat_template_kwargs may not set {key!r}")
        options.update({k: variables.pop(k) for k in list(options) if k in variables})
        source = self.template_source(tools=options["tools"])
        chat = [{k: v for k, v in dict(m).items() if v is not None} for m in messages]
        if not chat:
            raise TemplateError("the conversation is empty")
        chat = _alias_reasoning(chat)
        cont = options["continue_final_message"]
        if cont and options["add_generation_prompt"]:
            raise TemplateError("continue_final_message and add_generation_prompt cannot both be true")
        final = _tag_final_message(chat, source, "content" if cont is True else cont) if cont else None
        try:
            rendered: str = compile_template(source).render(
                messages=chat,
                tools=options["tools"],
                documents=options["documents"],
                add_generation_prompt=options["add_generation_prompt"],
                **{**self.special_tokens, **variables},
            )
        except (jinja2.TemplateError, TypeError, ValueError) as e:
            raise TemplateError(str(e) or type(e).__name__) from e
        return rendered if final is None else _cut_after_final(rendered, final)

    def encode_chat(
        self, messages: Sequence[Mapping[str, Any]], *, add_special_tokens: bool = False, **kwargs: Any
    ) -> list[int]:
        """``render_chat`` then ``encode`` (vLLM: ``add_special_tokens=False`` unless the
        request sets it)."""
        return self.encode(self.render_chat(messages, **kwargs), add_special_tokens=add_special_tokens)


def _alias_reasoning(chat: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for message in chat:
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        out.append(
            message
            if reasoning is None
            else {"thinking": reasoning, **message, "reasoning_content": reasoning}
        )
    return out


def _tag_final_message(chat: list[dict[str, Any]], source: str, key: str) -> str:
    """Append transformers' marker to the final message's ``key``; returns its text."""
    last = chat[-1] = dict(chat[-1])
    final = last.get(key)
    if final is None:
        raise TemplateError(f"continue_final_message: the final message has no {key!r}")
    fields = [f for f in _REASONING_FIELDS if last.get(f) == final] if key in _REASONING_FIELDS else [key]
    if not any(f in source for f in fields):
        raise TemplateError(f"continue_final_message: the template does not use {key!r}")
    if isinstance(final, (list, tuple)):
        blocks = [dict(b) if isinstance(b, Mapping) else b for b in final]
        for block in reversed(blocks):
            if isinstance(block, dict) and "text" in block:
                text: str = block["text"]
                block["text"] = text + _CONTINUE_TAG
                last[key] = blocks
                return text
        raise TemplateError("continue_final_message: the final message has no text to continue")
    for f in fields:
        last[f] = last[f] + _CONTINUE_TAG
    return str(final)


def _cut_after_final(rendered: str, final: str) -> str:
    tag = _CONTINUE_TAG.strip()
    if final.strip() not in rendered or tag not in rendered:
        raise TemplateError("continue_final_message: the template dropped part of the final message")
    at = rendered.rindex(tag)
    if rendered[at : at + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
        return rendered[:at]
    return rendered[:at].rstrip()


# --- the multi-turn prefix cache ----------------------------------------------------------------


@dataclass(frozen=True)
class _SplitFinder:
    """Where rendered text can be cut so that ``encode(a + b) == encode(a) + encode(b)``.

    ``tokenizers`` first cuts the text at added tokens (leftmost-longest), then normalizes
    and pre-tokenizes every piece on its own. A cut right after an added token ``A`` is
    therefore exact when the matcher really matches that occurrence of ``A`` whatever
    follows, and ``A`` takes nothing from the other side: ``A`` is matched on raw text
    (``normalized=False``), has no ``rstrip`` (it would swallow the whitespace after the
    cut) and no ``single_word`` (its match would depend on the next character), and no
    other added token occurrence overlaps ``A`` or straddles the cut (checked in a
    window, conservatively: any occurrence, matched or not, refuses the cut)."""

    anchors: re.Pattern[str]
    """The added tokens a cut may follow, longest first."""
    all_tokens: tuple[str, ...]
    longest: int

    @classmethod
    def of(cls, tokenizer: Tokenizer) -> _SplitFinder | None:
        added = list(tokenizer.get_added_tokens_decoder().values())
        safe = sorted(
            {t.content for t in added if t.content and not (t.normalized or t.rstrip or t.single_word)},
            key=len,
            reverse=True,
        )
        if not safe:
            return None
        tokens = tuple({t.content for t in added if t.content})
        return cls(re.compile("|".join(map(re.escape, safe))), tokens, max(map(len, tokens)))

    def cuts(self, text: str) -> Iterator[int]:
        """Exact cut positions in ``text``, ascending."""
        for m in self.anchors.finditer(text):
            if self._clear(text, m.start(), m.end()):
                yield m.end()

    def _clear(self, text: str, start: int, end: int) -> bool:
        lo = max(0, start - self.longest + 1)
        window = text[lo : end + self.longest - 1]
        for token in self.all_tokens:
            at = window.find(token)
            while at >= 0:
                a, b = lo + at, lo + at + len(token)
                if (a, b) != (start, end) and a < end and b > start:
                    return False
                at = window.find(token, at + 1)
        return True


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    reused_tokens: int = 0
    """Tokens taken from the cache instead of tokenized."""
    encoded_chars: int = 0
    """Characters actually tokenized."""


#: Per cached prefix: the caller's block keys of its ids (``extproc.picker``: by block size
#: and salt, the keys of the prefix's full blocks), filled by the caller, dropped with it.
#: Tuples: the cyclic GC untracks a tuple of bytes, where it would walk a list's every key
#: at each full collection (a full cache holds up to a million).
BlockKeys = dict[Hashable, tuple[bytes, ...]]


@dataclass(slots=True)
class _Entry:
    ids: array.array[int]
    block_keys: BlockKeys = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Probe:
    """What :meth:`CachedChatEncoder.lookup` found: ``text[:start]`` is ``prefix``."""

    start: int
    prefix: array.array[int]
    keys: list[tuple[int, bytes]]
    hit: bool
    #: The block keys cached beside ``prefix`` (a miss: an empty dict of no entry).
    block_keys: BlockKeys = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Encoded:
    """What :meth:`CachedChatEncoder.finish_entry` made: the ids, and the entry that now
    caches their first ``cached`` ids (the new prefix, else the probe's; none: 0)."""

    ids: list[int]
    cached: int
    #: That entry's block keys, for the caller to fill (no entry: a dict of no entry).
    block_keys: BlockKeys


@dataclass
class CachedChatEncoder:
    """``PromptTokenizer.encode_chat`` that tokenizes only what it has not seen.

    Token ids are cached by the rendered text up to the last exact cut (``_SplitFinder``)
    of each chat, keyed by a 128-bit xxh3 hash of that prefix. A request looks its own
    cut points up from the longest down, so a follow-up turn (the previous rendering plus
    the new messages) reuses the previous ids and tokenizes only the new suffix. LRU
    bounded by ``max_entries`` and ``max_tokens`` (the sum of cached ids). Thread-safe:
    the cache is touched under a lock, tokenizing runs outside it. With no usable added
    token (or ``add_special_tokens=True``) every call tokenizes the whole text.

    Each entry also carries ``block_keys`` (see :class:`Probe` / :class:`Encoded`): the
    picker keeps the block keys of the cached ids there, so a follow-up turn hashes only
    its new blocks. They live and die with the entry (a few keys per 16 ids, not counted
    in ``max_tokens``); the picker bounds the variants (salts) per entry."""

    tokenizer: PromptTokenizer
    max_entries: int = 4096
    max_tokens: int = 16_000_000
    stats: CacheStats = field(default_factory=CacheStats)
    _finder: _SplitFinder | None = field(init=False, repr=False)
    _entries: OrderedDict[bytes, _Entry] = field(init=False, repr=False, default_factory=OrderedDict)
    _tokens: int = field(init=False, repr=False, default=0)
    _lock: threading.Lock = field(init=False, repr=False, default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._finder = _SplitFinder.of(self.tokenizer.tokenizer)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def cached_tokens(self) -> int:
        return self._tokens

    def encode_chat(
        self, messages: Sequence[Mapping[str, Any]], *, add_special_tokens: bool = False, **kwargs: Any
    ) -> list[int]:
        """Same result as ``PromptTokenizer.encode_chat``."""
        text = self.tokenizer.render_chat(messages, **kwargs)
        return self.encode_text(text, add_special_tokens=add_special_tokens)

    def encode_text(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        """``PromptTokenizer.encode(text)``, reusing cached prefixes of ``text``."""
        if add_special_tokens or self._finder is None:
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        return self.finish(text, self.lookup(text))

    def lookup(self, text: str) -> Probe:
        """The cached prefix of ``text`` (cheap: one hash pass): ``len(text) - probe.start``
        characters are left to tokenize, so a caller can tell a quick follow-up turn from a
        first turn before deciding where to run :meth:`finish`."""
        if self._finder is None:
            return Probe(0, array.array("I"), [], hit=False)
        keys = self._prefix_keys(text)
        with self._lock:
            for cut, key in reversed(keys):
                if (entry := self._entries.get(key)) is not None:
                    self._entries.move_to_end(key)
                    return Probe(cut, entry.ids, keys, hit=True, block_keys=entry.block_keys)
        return Probe(0, array.array("I"), keys, hit=False)

    def finish(self, text: str, probe: Probe) -> list[int]:
        """Tokenize what ``probe`` left (without special tokens) and cache the new prefix."""
        return self.finish_entry(text, probe).ids

    def finish_entry(self, text: str, probe: Probe) -> Encoded:
        """:meth:`finish`, also naming the cache entry of the result's prefix, so the
        caller can keep what it derives from those ids (block keys) beside them."""
        start, prefix, keys = probe.start, probe.prefix, probe.keys
        last_cut, last_key = keys[-1] if keys else (0, b"")
        encode = self.tokenizer.encode
        if last_cut > start:
            middle = encode(text[start:last_cut], add_special_tokens=False)
            tail = encode(text[last_cut:], add_special_tokens=False)
            stored = prefix + array.array("I", middle)
            entry = self._store(last_key, stored)
            result = stored.tolist() + tail
            encoded = Encoded(result, len(stored), entry.block_keys) if entry else Encoded(result, 0, {})
        else:
            result = prefix.tolist() + encode(text[start:], add_special_tokens=False)
            encoded = Encoded(result, len(prefix), probe.block_keys) if probe.hit else Encoded(result, 0, {})
        with self._lock:
            if probe.hit:
                self.stats.hits += 1
                self.stats.reused_tokens += len(prefix)
            else:
                self.stats.misses += 1
            self.stats.encoded_chars += len(text) - start
        return encoded

    def _prefix_keys(self, text: str) -> list[tuple[int, bytes]]:
        """(cut, hash of ``text[:cut]``) for every exact cut, from one pass over the text."""
        assert self._finder is not None
        hasher = xxhash.xxh3_128()
        keys: list[tuple[int, bytes]] = []
        previous = 0
        for cut in self._finder.cuts(text):
            hasher.update(text[previous:cut].encode("utf-8", "surrogatepass"))
            keys.append((cut, hasher.digest()))
            previous = cut
        return keys

    def _store(self, key: bytes, ids: array.array[int]) -> _Entry | None:
        """Cache ``ids`` under ``key``; the entry (an equal one cached already is kept, with
        its block keys: the same text has the same ids), ``None`` when too large."""
        if len(ids) > self.max_tokens:
            return None
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                return entry
            entry = self._entries[key] = _Entry(ids)
            self._tokens += len(ids)
            while len(self._entries) > self.max_entries or self._tokens > self.max_tokens:
                _, evicted = self._entries.popitem(last=False)
                self._tokens -= len(evicted.ids)
            return entry

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._tokens = 0
