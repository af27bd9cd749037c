"""The server's PromptTemplates: the store, the ``PUT /templates`` wire format, and the
templated-request rewrite.

Owner: ``inference_cache.extproc``. Place in the flow::

    operator --PUT /templates--> decode --> TemplateStore.replace   (replace-on-write)
    serve config templates: ----> from_config --^
    RenderTemplate (grpc_api) --TemplateStore.lookup--> render.render + stable_keys (LRU)
    ext_proc picker           --TemplateStore.lookup--> render.render --> rewrite (plain
                                                        OpenAI body for the engine)

Rules (``docs/templates.md``): a template is named ``namespace/name`` and is usable from its
own namespace and from those in ``spec.allowedNamespaces``; from anywhere else it does not
exist (``TEMPLATE_NOT_FOUND``, the same answer as an unknown name, so names do not leak
across tenants). Every write replaces the whole set (the operator sends all templates).

The stable keys of one (template revision, model, Stable values, salt) never change, and
``render.stable_prefix`` costs 10-40 ms of tokenizer probing, so :meth:`stable_keys` keeps
the last results in a small LRU cache (thread-safe: it runs in worker threads).
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, NoReturn

from inference_cache import render
from inference_cache.render import engine

#: The ``PUT /templates`` schema version this server accepts.
TEMPLATES_WIRE_VERSION: Final = 1
#: Stable-prefix results kept (one per template revision x model x Stable values x salt).
DEFAULT_CACHE_SIZE: Final = 256

_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\Z")
_NAME = re.compile(r"[a-z0-9]([-.a-z0-9]{0,251}[a-z0-9])?\Z")
_TEMPLATE_KEYS = frozenset({"namespace", "name", "revision", "spec"})


class TemplateDecodeError(ValueError):
    """A ``PUT /templates`` body or a config entry that must be refused; ``str()`` says
    where (``templates[2].spec.body (line 1, column 4): ...``)."""


@dataclass(frozen=True, slots=True)
class StoredTemplate:
    namespace: str
    name: str
    spec: render.TemplateSpec
    #: ``render.revision(spec)`` (the PromptTemplate's ``status.templateRevision``).
    revision: str

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    def usable_from(self, namespace: str) -> bool:
        return namespace == self.namespace or namespace in self.spec.allowed_namespaces


def build(namespace: str, name: str, spec: Mapping[str, Any], *, where: str = "") -> StoredTemplate:
    """Check the names and decode ``spec``; raises :class:`TemplateDecodeError` with
    ``where`` (``templates[0]``) in front of the offending path."""
    prefix = f"{where}." if where else ""
    if not _NAMESPACE.match(namespace):
        raise TemplateDecodeError(f"{prefix}namespace: {namespace!r} is not a namespace name")
    if not _NAME.match(name):
        raise TemplateDecodeError(f"{prefix}name: {name!r} is not an object name (RFC 1123 subdomain)")
    try:
        decoded = render.TemplateSpec.from_dict(spec)
    except render.TemplateSpecError as e:
        raise TemplateDecodeError(f"{prefix}{e}") from e
    return StoredTemplate(namespace, name, decoded, render.revision(decoded))


def split_ref(ref: str, namespace: str) -> tuple[str, str]:
    """``"ns/name"`` -> (ns, name); a bare ``"name"`` is in the caller's ``namespace``."""
    ns, sep, name = ref.partition("/")
    return (ns, name) if sep else (namespace, ref)


# -- the store --------------------------------------------------------------------------


class TemplateStore:
    """namespace/name -> template; replaced whole on every write, read lock-free."""

    def __init__(
        self, templates: Iterable[StoredTemplate] = (), *, cache_size: int = DEFAULT_CACHE_SIZE
    ) -> None:
        self._templates: Mapping[tuple[str, str], StoredTemplate] = {}
        self._cache: OrderedDict[tuple[Any, ...], render.StablePrefix] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        #: Called with every new set after the swap (the server's warm-up listens here).
        self.on_replace: Callable[[Sequence[StoredTemplate]], None] | None = None
        self.replace(templates)

    def replace(self, templates: Iterable[StoredTemplate]) -> None:
        """The new set (a later duplicate of a ref wins); one atomic swap, then
        ``on_replace``."""
        items = tuple(templates)
        self._templates = {(t.namespace, t.name): t for t in items}
        if self.on_replace is not None:
            self.on_replace(items)

    def __len__(self) -> int:
        return len(self._templates)

    def lookup(self, ref: str, namespace: str) -> StoredTemplate | None:
        """The template ``ref`` (``ns/name``, or ``name`` in ``namespace``) if it exists
        and is usable from ``namespace``; else ``None``."""
        template = self._templates.get(split_ref(ref, namespace))
        if template is None or not template.usable_from(namespace):
            return None
        return template

    def stable_keys(
        self,
        template: StoredTemplate,
        tokenizer: render.ChatTokenizer,
        *,
        model: str,
        block_size: int,
        variables: Mapping[str, object],
        salt: str | None = None,
        max_value_bytes: int | None = None,
    ) -> render.StablePrefix:
        """``render.stable_prefix`` through the LRU cache (keyed by the normalised Stable
        values, so inputs equal after normalisation share an entry). Raises what
        ``stable_prefix`` raises; CPU-bound: call it in a worker thread."""
        values = engine.check_values(
            template.spec, variables, max_value_bytes=max_value_bytes, stable_only=True
        )
        key = (template.ref, template.revision, model, block_size, tuple(sorted(values.items())), salt)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        prefix = render.stable_prefix(template.spec, tokenizer, block_size, variables=values, salt=salt)
        with self._lock:
            self._cache[key] = prefix
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return prefix

    @property
    def cached(self) -> int:
        """Stable-prefix results in the cache."""
        return len(self._cache)


# -- PUT /templates -----------------------------------------------------------------------


def _fail(message: str) -> NoReturn:
    raise TemplateDecodeError(message)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            _fail(f"duplicate field {k!r}")
        out[k] = v
    return out


def _reject_constant(name: str) -> NoReturn:
    _fail(f"invalid JSON number {name}")


def decode(body: bytes) -> tuple[StoredTemplate, ...]:
    """A ``PUT /templates`` body -> the templates, strictly::

        {"version": 1, "templates": [{"namespace": "team-a", "name": "support",
                                      "revision": "<16 hex>", "spec": {...}}]}

    Unknown or missing fields, wrong types, duplicate JSON keys, a repeated
    namespace/name, an invalid spec (``render.TemplateSpecError``, with its path) and a
    ``revision`` other than ``render.revision(spec)`` (the operator and the server would
    disagree on ``templateRevision``) are :class:`TemplateDecodeError`."""
    try:
        obj = json.loads(body, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except TemplateDecodeError:
        raise
    except UnicodeDecodeError as e:
        _fail(f"invalid UTF-8 at byte {e.start}")
    except json.JSONDecodeError as e:
        _fail(f"not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})")
    except (ValueError, RecursionError):
        _fail("not valid JSON")
    if not isinstance(obj, dict):
        _fail("expected a JSON object")
    unknown = sorted(set(obj) - {"version", "templates"})
    if unknown:
        _fail(f"unknown field {unknown[0]!r} (known: templates, version)")
    version = obj.get("version")
    if type(version) is not int or version != TEMPLATES_WIRE_VERSION:
        _fail(f"unsupported templates version {version!r} (want {TEMPLATES_WIRE_VERSION})")
    items = obj.get("templates")
    if not isinstance(items, list):
        _fail("templates: expected a list")
    out: list[StoredTemplate] = []
    seen: dict[tuple[str, str], int] = {}
    for i, raw in enumerate(items):
        where = f"templates[{i}]"
        if not isinstance(raw, dict):
            _fail(f"{where}: expected an object")
        fields = _fields(raw, where)
        t = build(fields["namespace"], fields["name"], fields["spec"], where=where)
        if fields["revision"] != t.revision:
            _fail(f"{where}.revision: {fields['revision']!r} is not the spec's revision {t.revision!r}")
        first = seen.setdefault((t.namespace, t.name), i)
        if first != i:
            _fail(f"{where}: {t.ref} is already templates[{first}]")
        out.append(t)
    return tuple(out)


def _fields(raw: Mapping[str, Any], where: str) -> dict[str, Any]:
    for key in sorted(raw):
        if key not in _TEMPLATE_KEYS:
            _fail(f"{where}.{key}: unknown field (known: {', '.join(sorted(_TEMPLATE_KEYS))})")
    for key in sorted(_TEMPLATE_KEYS):
        if key not in raw:
            _fail(f"{where}.{key}: required field is missing")
        want = dict if key == "spec" else str
        if not isinstance(raw[key], want):
            _fail(f"{where}.{key}: expected {'an object' if want is dict else 'a string'}")
    return dict(raw)


def encode(templates: Sequence[StoredTemplate]) -> bytes:
    """The body ``decode`` reads (the operator's side, and tests)."""
    return json.dumps(
        {
            "version": TEMPLATES_WIRE_VERSION,
            "templates": [
                {"namespace": t.namespace, "name": t.name, "revision": t.revision, "spec": t.spec.to_dict()}
                for t in templates
            ],
        },
        ensure_ascii=False,
    ).encode()


# -- the templated request ----------------------------------------------------------------


def rendered_json(rendered: render.Rendered) -> str:
    """The RPC's ``rendered_prompt``: the text, or the JSON array of chat messages."""
    if rendered.text is not None:
        return rendered.text
    assert rendered.messages is not None
    return json.dumps([m.to_openai() for m in rendered.messages], ensure_ascii=False)


def rewrite(body: Mapping[str, Any], rendered: render.Rendered) -> bytes:
    """The plain OpenAI request for the engine: ``body`` without ``template``, with the
    rendering as ``prompt`` (text template) or ``messages`` (chat template)."""
    out = {k: v for k, v in body.items() if k != "template"}
    if rendered.text is not None:
        out["prompt"] = rendered.text
    else:
        assert rendered.messages is not None
        out["messages"] = [m.to_openai() for m in rendered.messages]
    return json.dumps(out, ensure_ascii=False).encode()
