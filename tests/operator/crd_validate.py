"""Validate a custom resource against a CustomResourceDefinition the way the apiserver would.

Owner: tests (issue #7, H-schema). Place in the flow: every object the operator emits, every
sample in ``config/samples/`` and every object of ``config/install.yaml`` that has a CRD here
(ours in ``config/crd/bases/``, the upstream ones in ``../shared/data/crds/``) goes through
:func:`validate` in tests, because no kube-apiserver can run in this environment.

What it does, in the apiserver's order:

1. picks the version named by the object's ``apiVersion`` (or ``version=``), which must be
   served, and checks ``kind``;
2. applies the schema's ``default``\\ s (structural defaulting: a default fills an absent
   field of a present parent, and is itself defaulted further);
3. converts the structural schema to JSON Schema and validates with ``jsonschema``:
   ``nullable`` becomes a ``null`` type, ``format: int32/int64`` are range-checked, and an
   object without ``x-kubernetes-preserve-unknown-fields`` gets ``additionalProperties:
   false`` -- the apiserver would *prune* unknown fields silently, which in our tests is a
   bug, so it is an error here; ``metadata`` at the root stays open (ObjectMeta);
4. checks ``x-kubernetes-list-type`` ``map`` (unique keys) and ``set`` (unique items);
5. evaluates every ``x-kubernetes-validations`` rule with ``celpy`` at its path, ``self``
   bound to the (defaulted) value there; property names that are CEL keywords are escaped as
   the apiserver does (``namespace`` -> ``__namespace__``); transition rules (``oldSelf``)
   do not run on create. A failing rule reports its ``message`` (or ``failed rule: <rule>``).

Rules ``celpy`` cannot compile, or that call a function it does not have (the Kubernetes CEL
libraries ``upperAscii``/``lowerAscii`` are supplied here), must be listed in
:data:`UNEVALUATED_RULES` with the reason; an unlisted one raises :class:`UnevaluableRuleError`, so
a new upstream rule fails the tests until someone looks at it. :func:`unevaluable_rules` does
the same audit statically for a whole CRD.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import yaml
from celpy import celtypes
from celpy.celparser import CELParseError
from celpy.evaluation import CELEvalError, base_functions
from lark import Token, Tree

JSON = Any

REPO_ROOT = Path(__file__).resolve().parents[2]
OUR_CRDS_DIR = REPO_ROOT / "config" / "crd" / "bases"
SHARED_CRDS_DIR = REPO_ROOT / ".." / "shared" / "data" / "crds"
# (group, kind) -> the upstream CRD file we validate emitted objects against.
UPSTREAM_CRDS: Mapping[tuple[str, str], Path] = {
    ("inference.networking.k8s.io", "InferencePool"): SHARED_CRDS_DIR
    / "gaie"
    / "inference.networking.k8s.io_inferencepools.v1.main.yaml",
    ("gateway.envoyproxy.io", "EnvoyExtensionPolicy"): SHARED_CRDS_DIR
    / "envoy-gateway"
    / "gateway.envoyproxy.io_envoyextensionpolicies.main.yaml",
    ("gateway.envoyproxy.io", "BackendTrafficPolicy"): SHARED_CRDS_DIR
    / "envoy-gateway"
    / "gateway.envoyproxy.io_backendtrafficpolicies.main.yaml",
    ("gateway.networking.k8s.io", "HTTPRoute"): SHARED_CRDS_DIR
    / "gateway-api"
    / "gateway.networking.k8s.io_httproutes.standard.v1.6.1.yaml",
}

# (CRD metadata.name, rule text) -> why celpy cannot evaluate it. Each of these rules is
# skipped (not evaluated) wherever it appears; anything unevaluable and unlisted raises.
UNEVALUATED_RULES: Mapping[tuple[str, str], str] = {}

_CEL_RESERVED = frozenset(
    [
        "true",
        "false",
        "null",
        "in",
        "as",
        "break",
        "const",
        "continue",
        "else",
        "for",
        "function",
        "if",
        "import",
        "let",
        "loop",
        "package",
        "namespace",
        "return",
        "var",
    ]
)
_MACROS = frozenset({"has", "all", "exists", "exists_one", "map", "filter"})


class UnevaluableRuleError(Exception):
    """A CEL rule celpy cannot run and that is not listed in UNEVALUATED_RULES."""


def load_crd(path: str | Path) -> dict[str, JSON]:
    """The single CustomResourceDefinition document in ``path``."""
    docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d]
    crds = [d for d in docs if d.get("kind") == "CustomResourceDefinition"]
    if len(crds) != 1:
        raise ValueError(f"{path}: expected one CustomResourceDefinition, found {len(crds)}")
    return dict(crds[0])


@functools.cache
def _known_crds() -> dict[tuple[str, str], Path]:
    known = dict(UPSTREAM_CRDS)
    for path in sorted(OUR_CRDS_DIR.glob("*.yaml")):
        crd = load_crd(path)
        known[(crd["spec"]["group"], crd["spec"]["names"]["kind"])] = path
    return known


def crd_for(obj: Mapping[str, JSON]) -> dict[str, JSON] | None:
    """The CRD (ours in config/crd/bases, or a pinned upstream one) defining ``obj``'s kind."""
    group = str(obj.get("apiVersion", "")).rpartition("/")[0]
    path = _known_crds().get((group, str(obj.get("kind", ""))))
    return copy.deepcopy(_load_cached(path)) if path is not None else None


@functools.cache
def _load_cached(path: Path) -> dict[str, JSON]:
    return load_crd(path)


# ---- Kubernetes CEL extension functions celpy lacks -------------------------------------


def _upper_ascii(s: celtypes.StringType) -> celtypes.StringType:
    return celtypes.StringType(re.sub(r"[a-z]+", lambda m: m.group(0).upper(), s))


def _lower_ascii(s: celtypes.StringType) -> celtypes.StringType:
    return celtypes.StringType(re.sub(r"[A-Z]+", lambda m: m.group(0).lower(), s))


_EXTENSIONS: dict[str, Callable[..., Any]] = {"upperAscii": _upper_ascii, "lowerAscii": _lower_ascii}
_KNOWN_FUNCTIONS = frozenset(base_functions) | frozenset(_EXTENSIONS) | _MACROS
_ENV = celpy.Environment()


def _called_functions(tree: Tree[Token]) -> Iterator[str]:
    for node in tree.iter_subtrees():
        if node.data == "member_dot_arg":
            yield str(node.children[1])
        elif node.data == "ident_arg":
            yield str(node.children[0])


@functools.cache
def _compile(rule: str) -> tuple[celpy.Runner | None, str | None]:
    """(program, None) or (None, why it cannot be evaluated)."""
    try:
        ast = _ENV.compile(rule)
    except CELParseError as exc:
        return None, f"celpy cannot parse it: {exc}"
    missing = sorted(set(_called_functions(ast)) - _KNOWN_FUNCTIONS)
    if missing:
        return None, f"celpy has no function {', '.join(missing)}"
    return _ENV.program(ast, functions=_EXTENSIONS), None


def _is_transition_rule(rule: str) -> bool:
    return re.search(r"\boldSelf\b", rule) is not None


# ---- schema walking -------------------------------------------------------------------


def _crd_name(crd: Mapping[str, JSON]) -> str:
    return str(crd.get("metadata", {}).get("name", ""))


def _version(crd: Mapping[str, JSON], name: str) -> Mapping[str, JSON]:
    for v in crd["spec"]["versions"]:
        if v["name"] == name:
            return dict(v)
    raise KeyError(name)


def schema_of(crd: Mapping[str, JSON], version: str) -> dict[str, JSON]:
    """The openAPIV3Schema of one version of ``crd``."""
    return dict(_version(crd, version)["schema"]["openAPIV3Schema"])


def all_rules(crd: Mapping[str, JSON]) -> Iterator[tuple[str, str, Mapping[str, JSON]]]:
    """Every ``(version, schema path, rule)`` in ``crd``."""

    def walk(node: JSON, path: str, version: str) -> Iterator[tuple[str, str, Mapping[str, JSON]]]:
        if isinstance(node, dict):
            for rule in node.get("x-kubernetes-validations", ()):
                yield version, path, rule
            for key, child in node.items():
                if key != "x-kubernetes-validations":
                    yield from walk(child, f"{path}/{key}", version)
        elif isinstance(node, list):
            for i, child in enumerate(node):
                yield from walk(child, f"{path}/{i}", version)

    for v in crd["spec"]["versions"]:
        yield from walk(v["schema"]["openAPIV3Schema"], "", v["name"])


def unevaluable_rules(crd: Mapping[str, JSON]) -> dict[str, str]:
    """Rule text -> reason, for every rule of ``crd`` celpy cannot compile or run."""
    out: dict[str, str] = {}
    for _, _, rule in all_rules(crd):
        _, why = _compile(rule["rule"])
        if why is not None:
            out[rule["rule"]] = why
    return out


def _escape(name: str) -> str:
    if name in _CEL_RESERVED:
        return f"__{name}__"
    name = name.replace("__", "__underscores__")
    for char, word in ((".", "dot"), ("-", "dash"), ("/", "slash")):
        name = name.replace(char, f"__{word}__")
    return name


def apply_defaults(value: JSON, schema: Mapping[str, JSON]) -> JSON:
    """A copy of ``value`` with the structural schema's defaults applied."""
    value = copy.deepcopy(value)
    _default_in_place(value, schema)
    return value


def _default_in_place(value: JSON, schema: Mapping[str, JSON]) -> None:
    if isinstance(value, dict):
        for key, sub in schema.get("properties", {}).items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                _default_in_place(value[key], sub)
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key, item in value.items():
                if key not in schema.get("properties", {}):
                    _default_in_place(item, extra)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            _default_in_place(item, schema["items"])


def to_json_schema(schema: Mapping[str, JSON]) -> dict[str, JSON]:
    """A structural schema (node) as a JSON Schema (draft 4) with pruning as an error."""
    return _to_json_schema(schema, structural=True)


def _to_json_schema(node: Mapping[str, JSON], *, structural: bool, root: bool = False) -> dict[str, JSON]:
    out: dict[str, JSON] = {}
    for key, sub in node.items():
        if key.startswith("x-kubernetes-") or key in ("nullable", "default", "description", "example"):
            continue
        if key == "properties":
            out[key] = {k: _to_json_schema(v, structural=True) for k, v in sub.items()}
        elif (key == "items" and isinstance(sub, dict)) or (
            key == "additionalProperties" and isinstance(sub, dict)
        ):
            out[key] = _to_json_schema(sub, structural=True)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [_to_json_schema(s, structural=False) for s in sub]
        elif key == "not":
            out[key] = _to_json_schema(sub, structural=False)
        else:
            out[key] = copy.deepcopy(sub)
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if node.get("x-kubernetes-embedded-resource"):
        props = out.setdefault("properties", {})
        props.setdefault("apiVersion", {"type": "string"})
        props.setdefault("kind", {"type": "string"})
        props.setdefault("metadata", {"type": "object"})
    is_object = node.get("type") == "object" or "properties" in node
    if (
        structural
        and is_object
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    if root:
        out.setdefault("properties", {})["metadata"] = {"type": "object"}
    return out


FORMATS = jsonschema.FormatChecker(formats=())
"""The formats the apiserver checks that jsonschema does not by default (int32, int64)."""


@FORMATS.checks("int32")
def _int32(value: object) -> bool:
    return not isinstance(value, int) or -(2**31) <= value < 2**31


@FORMATS.checks("int64")
def _int64(value: object) -> bool:
    return not isinstance(value, int) or -(2**63) <= value < 2**63


def _path(parts: Iterator[str | int] | Any) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "<root>"


def _to_cel(value: JSON, schema: Mapping[str, JSON]) -> Any:
    if value is None:
        return None
    if isinstance(value, bool):
        return celtypes.BoolType(value)
    if isinstance(value, int):
        return celtypes.DoubleType(value) if schema.get("type") == "number" else celtypes.IntType(value)
    if isinstance(value, float):
        return celtypes.DoubleType(value)
    if isinstance(value, str):
        return celtypes.StringType(value)
    if isinstance(value, list):
        return celtypes.ListType([_to_cel(v, schema.get("items", {})) for v in value])
    props: Mapping[str, JSON] = schema.get("properties", {})
    extra = schema.get("additionalProperties")
    extra_schema: Mapping[str, JSON] = extra if isinstance(extra, dict) else {}
    if props:
        return celtypes.MapType(
            {celtypes.StringType(_escape(k)): _to_cel(v, props.get(k, {})) for k, v in value.items()}
        )
    return celtypes.MapType({celtypes.StringType(k): _to_cel(v, extra_schema) for k, v in value.items()})


def _check_node(crd_name: str, value: JSON, schema: Mapping[str, JSON], path: str, errors: list[str]) -> None:
    if value is None:
        return
    shown = path or "<root>"
    list_type = schema.get("x-kubernetes-list-type")
    if isinstance(value, list) and list_type in ("map", "set"):
        keys = schema.get("x-kubernetes-list-map-keys", [])
        seen: set[str] = set()
        for i, item in enumerate(value):
            ident = json.dumps(
                [item.get(k) for k in keys] if list_type == "map" and isinstance(item, dict) else item,
                sort_keys=True,
            )
            if ident in seen:
                errors.append(f"{shown}[{i}]: Duplicate value: {ident}")
            seen.add(ident)
    for rule in schema.get("x-kubernetes-validations", ()):
        _run_rule(crd_name, rule, value, schema, shown, errors)
    if isinstance(value, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            sub = props.get(key, extra if isinstance(extra, dict) else None)
            if sub is not None:
                _check_node(crd_name, item, sub, f"{path}.{key}" if path else key, errors)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            _check_node(crd_name, item, schema["items"], f"{path}[{i}]", errors)


def _run_rule(
    crd_name: str,
    rule: Mapping[str, JSON],
    value: JSON,
    schema: Mapping[str, JSON],
    path: str,
    errors: list[str],
) -> None:
    text = str(rule["rule"])
    if _is_transition_rule(text):
        return
    program, why = _compile(text)
    if program is None:
        if (crd_name, text) in UNEVALUATED_RULES:
            return
        raise UnevaluableRuleError(f"{crd_name}: {why}; list it in UNEVALUATED_RULES: {text!r}")
    where = f"{path}.{rule['fieldPath'].lstrip('.')}" if rule.get("fieldPath") else path
    try:
        result = program.evaluate({"self": _to_cel(value, schema)})
    except CELEvalError as exc:
        errors.append(f"{where}: rule evaluation error: {text}: {exc.args[0]}")
        return
    if isinstance(result, CELEvalError):
        errors.append(f"{where}: rule evaluation error: {text}: {result.args[0]}")
    elif result != celtypes.BoolType(True):
        errors.append(f"{where}: {rule.get('message') or f'failed rule: {text}'}")


def defaulted(obj: Mapping[str, JSON], crd: Mapping[str, JSON] | Path, *, version: str | None = None) -> JSON:
    """``obj`` as the apiserver would store it after structural defaulting."""
    crd = load_crd(crd) if isinstance(crd, Path) else crd
    return apply_defaults(dict(obj), schema_of(crd, version or _object_version(obj, crd)))


def _object_version(obj: Mapping[str, JSON], crd: Mapping[str, JSON]) -> str:
    group, _, version = str(obj.get("apiVersion", "")).rpartition("/")
    if group != crd["spec"]["group"]:
        raise ValueError(f"apiVersion {obj.get('apiVersion')!r} is not in group {crd['spec']['group']!r}")
    return version


def validate(
    obj: Mapping[str, JSON], crd: Mapping[str, JSON] | Path, *, version: str | None = None
) -> list[str]:
    """Errors the apiserver would report creating ``obj`` (empty list: valid).

    Raises UnevaluableRuleError for a CEL rule celpy cannot run that is not listed in
    UNEVALUATED_RULES.
    """
    crd = load_crd(crd) if isinstance(crd, Path) else crd
    errors: list[str] = []
    group = crd["spec"]["group"]
    if version is None:
        try:
            version = _object_version(obj, crd)
        except ValueError as exc:
            return [f"apiVersion: {exc}"]
    try:
        entry = _version(crd, version)
    except KeyError:
        return [f"apiVersion: {group}/{version} is not a version of {_crd_name(crd)}"]
    if not entry.get("served"):
        return [f"apiVersion: {group}/{version} is not served"]
    if obj.get("kind") != crd["spec"]["names"]["kind"]:
        errors.append(f"kind: expected {crd['spec']['names']['kind']!r}, got {obj.get('kind')!r}")
    if crd["spec"].get("scope") == "Cluster" and obj.get("metadata", {}).get("namespace"):
        errors.append("metadata.namespace: a cluster-scoped object has no namespace")
    schema = schema_of(crd, version)
    value = apply_defaults(dict(obj), schema)
    validator = jsonschema.Draft4Validator(
        _to_json_schema(schema, structural=True, root=True), format_checker=FORMATS
    )
    for err in sorted(
        validator.iter_errors(value), key=lambda e: (list(map(str, e.absolute_path)), e.message)
    ):
        errors.append(f"{_path(err.absolute_path)}: {err.message}")
    if errors:
        return errors
    _check_node(_crd_name(crd), value, schema, "", errors)
    return errors
