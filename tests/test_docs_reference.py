"""The reference docs are complete: every flag, config key, metric and reason code the code
defines is documented, and the documented ones still exist.

What is real: the names come from the code only: the argparse tree ``inference_cache.cli``
builds (each subcommand's owner loaded as ``main`` loads it), the serve config's frozen
dataclasses walked recursively (``inference_cache.config.Config``), the Prometheus
registry of a ``Server`` built from a config (not started: no port, no task), and the
reason-code enums and constants (``picking.ErrorKind``/``ERRORS``, ``index.types.Strategy``,
``grpc_api``'s codes, ``picker.MATCH_*``). What is parsed: the Markdown of ``docs/`` (headings,
tables, backticked names), so each check names the section or table it reads.

Where each thing is documented:

- flags of ``inference-cache <command>``: ``docs/configuration.md``, the section whose
  heading names `` `inference-cache <command>` ``; the operator's in ``docs/operator.md``,
  "The operator process";
- config file keys: ``docs/configuration.md``, "The configuration file": one table row per
  key, in the table introduced by its parent (`` `models[]`: ``, `` `limits:` ``, ...), with
  the code's default, or the dotted key backticked (``server.<key>`` in the flags table's
  file-key column, beside its ``INFERENCE_CACHE_<KEY>`` variable);
- metrics: ``docs/metrics.md``, one table row per ``inferencecache_*`` family under its
  exposed name (counters with ``_total``); other families (``process_*``) may be named by a
  backticked glob; the decision ``match`` values in the decisions row;
- reason codes: ``docs/reason-codes.md`` tables with a ``code`` column (LookupRoute,
  RenderTemplate) and the ``kind`` table of the ext_proc errors, with the status, type and
  code of ``ERRORS`` and the Envoy details ``inference_cache_<kind>`` the protocol sends.

The reverse checks (documented but gone) read reference-table rows (flags, keys, codes),
``server.<key>`` and ``INFERENCE_CACHE_*`` names and every backticked ``inferencecache_*``
name, never other prose, so passing mentions (vLLM's flags, Go spellings, examples) need no
allowlist. Flag defaults are not compared: their documented forms (``1k,8k,32k``, ``100ms``,
paths relative to the checkout) differ from the parsed values by design.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cli_walk
import yaml
from prometheus_client import CollectorRegistry

from inference_cache import cli
from inference_cache import config as config_mod
from inference_cache.extproc import auth, grpc_api, picker, picking, protocol, serve, warmup
from inference_cache.index import types as index_types

DOCS = Path(__file__).resolve().parents[1] / "docs"

#: Commands whose flags are not documented in ``configuration.md`` -> (doc, heading).
FLAG_HOMES = {"operator": ("operator.md", "The operator process")}


# -- Markdown ------------------------------------------------------------------------------


def _doc(name: str) -> str:
    return (DOCS / name).read_text(encoding="utf-8")


def _section(text: str, match: typing.Callable[[str], bool]) -> str:
    """The body of the first heading ``match`` accepts, up to the next heading of the
    same or a higher level (its subsections included)."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"(#+) (.*)", line)
        if m and match(m.group(2)):
            level = len(m.group(1))
            end = next(
                (
                    j
                    for j in range(i + 1, len(lines))
                    if (h := re.match(r"(#+) ", lines[j])) and len(h.group(1)) <= level
                ),
                len(lines),
            )
            return "\n".join(lines[i + 1 : end])
    raise AssertionError(f"no section matching {match!r}")


def _cells(line: str) -> list[str]:
    """The cells of a table row; a ``|`` inside backticks does not split."""
    cells, cell, code = [], "", False
    for ch in line.strip().strip("|"):
        if ch == "`":
            code = not code
        if ch == "|" and not code:
            cells.append(cell.strip())
            cell = ""
        else:
            cell += ch
    cells.append(cell.strip())
    return cells


def _tables(text: str) -> Iterator[tuple[list[str], list[list[str]]]]:
    """``(header cells, row cells)`` for each Markdown table of ``text``."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("|") and i + 1 < len(lines) and re.match(r"\|[\s:|-]+\|?$", lines[i + 1]):
            header = _cells(line)
            rows = []
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(_cells(lines[i]))
                i += 1
            yield header, rows
            continue
        i += 1


def _ticked(text: str) -> list[str]:
    return re.findall(r"`([^`\n]+)`", text)


def _missing(what: str, names: typing.Iterable[str]) -> str:
    return f"{what}:\n  " + "\n  ".join(sorted(names))


# -- flags -----------------------------------------------------------------------------------


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    """One spelling per option: its first ``--long`` one (serve's Go ``-name`` aliases are
    documented once, as a rule), else its only one; ``--help`` left out."""
    out = set()
    for action in parser._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        longs = [o for o in action.option_strings if o.startswith("--")]
        out.add((longs or action.option_strings)[0])
    return out


def _flag_section(command: str) -> str:
    doc, heading = FLAG_HOMES.get(command, ("configuration.md", f"`inference-cache {command}`"))
    return _section(_doc(doc), lambda h: heading in h)


def _flag_name(token: str) -> str | None:
    m = re.match(r"(--?[A-Za-z0-9][\w-]*)", token)
    return m.group(1) if m else None


def test_every_flag_is_documented_and_every_documented_flag_exists() -> None:
    missing, stale = [], []
    commands = list(cli_walk.commands())
    assert len(commands) >= len(cli.SUBCOMMANDS) + len(cli.BENCHES)
    for command, parser in commands:
        flags = _flags(parser)
        assert flags, f"{command}: no flags found (is the parser walk broken?)"
        section = _flag_section(command)
        mentioned = {_flag_name(t) for t in _ticked(section)}
        missing += [f"{command} {f}" for f in sorted(flags - mentioned)]
        every_spelling = {o for a in parser._actions for o in a.option_strings}
        for header, rows in _tables(section):
            if header[0] != "flag":
                continue
            for row in rows:
                for token in _ticked(row[0]):
                    name = _flag_name(token)
                    if name is not None and name not in every_spelling:
                        stale.append(f"{command} {name}")
    assert not missing, _missing("flags not documented (docs/configuration.md, operator.md)", missing)
    assert not stale, _missing("documented flags that no longer exist", stale)


# -- config keys -----------------------------------------------------------------------------


def _fields(cls: type, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field[Any], bool]]:
    """``(dotted key, its field, is a leaf)`` of a settings dataclass, recursively: a nested
    settings class is ``key.sub``, a list of them ``key[].sub``."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        key = prefix + f.name
        if typing.get_origin(tp) is tuple:
            item = typing.get_args(tp)[0]
            if isinstance(item, type) and dataclasses.is_dataclass(item):
                yield key, f, False
                yield from _fields(item, key + "[].")
                continue
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            yield key, f, False
            yield from _fields(tp, key + ".")
            continue
        yield key, f, True


def _key_rows(text: str) -> Iterator[tuple[str, dict[str, str]]]:
    """``(dotted key, its row by column)`` of the file section's tables: the row's
    backticked first cell, under the prefix of the paragraph that opened the table's part
    (`` `models[]`: ...`` -> ``models[].``; the section starts at the top level)."""
    section = _section(text, lambda h: h == "The configuration file")
    prefix = ""
    for paragraph in re.split(r"\n\s*\n", section):
        m = re.match(r"`([a-z_]+(?:\[\])*(?:\.[a-z_]+(?:\[\])*)*):?`", paragraph)
        if m:
            prefix = m.group(1) + "."
        for header, rows in _tables(paragraph):
            if header[0] != "key":
                continue
            for row in rows:
                for name in _ticked(row[0]):
                    if re.fullmatch(r"[\w.\[\]]+", name):
                        yield prefix + name, dict(zip(header, row, strict=False))


def test_every_config_key_is_documented_and_every_documented_key_exists() -> None:
    text = _doc("configuration.md")
    keys = {key: leaf for key, _f, leaf in _fields(config_mod.Config)}
    assert "scoring.recompute_congestion_weight" in keys and "models[].matching" in keys
    server_keys = {k for k in keys if k.startswith("server.")}
    rows = {key for key, _row in _key_rows(text)}
    ticked = set(_ticked(text))
    missing = [k for k, leaf in keys.items() if leaf and k not in rows and k not in ticked]
    assert not missing, _missing("config keys not documented (docs/configuration.md)", missing)
    stale = sorted(rows - set(keys))
    stale += sorted(f"server.{k}" for k in re.findall(r"`server\.(\w+)`", text) if f"server.{k}" not in keys)
    assert not stale, _missing("documented config keys that no longer exist", stale)
    envs = {config_mod.env_name(k.removeprefix("server.")) for k in server_keys}
    serve_section = _section(text, lambda h: h == "`inference-cache serve`")
    documented_envs = set(re.findall(r"`(INFERENCE_CACHE_[A-Z_]+)`", serve_section))
    assert not envs - documented_envs, _missing(
        "serve environment variables not documented", envs - documented_envs
    )
    assert not documented_envs - envs, _missing(
        "documented environment variables that do not exist", documented_envs - envs
    )


def _default_of(f: dataclasses.Field[Any]) -> Any:
    """What a documented default must say: ``required``, ``all defaults`` (a nested settings
    class), or the value as YAML reads it (a list for a tuple)."""
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    if dataclasses.is_dataclass(value):
        return "all defaults"
    return list(value) if isinstance(value, tuple) else value


def _documented_default(cell: str) -> Any:
    if cell in ("required", "all defaults"):
        return cell
    ticked = _ticked(cell)
    return yaml.safe_load(ticked[0]) if ticked else yaml.safe_load(cell.split()[0])


def test_every_documented_config_default_is_the_code_default() -> None:
    fields = {key: f for key, f, _leaf in _fields(config_mod.Config)}
    wrong, seen = [], 0
    for key, row in _key_rows(_doc("configuration.md")):
        if "default" not in row or key not in fields:
            continue  # a stale key: the completeness test names it
        seen += 1
        want, got = _default_of(fields[key]), _documented_default(row["default"])
        if got != want or isinstance(got, bool) != isinstance(want, bool):
            wrong.append(f"{key}: documented {row['default']!r}, the code says {want!r}")
    assert seen > 40
    assert not wrong, _missing("config defaults that disagree with the code (docs/configuration.md)", wrong)


# -- metrics ---------------------------------------------------------------------------------


def _registry() -> CollectorRegistry:
    """The registry ``/metrics`` serves, of a server built with every optional series on
    (the template warm-up registers its counter only when enabled); not started."""
    config = config_mod.Config(warmup=config_mod.WarmupSettings(enabled=True))
    return serve.Server(config).metrics.registry


def _exposed(registry: CollectorRegistry) -> dict[str, set[str]]:
    """Family -> every name it exposes: the family name, and its samples' names (a
    counter's ``_total``, a histogram's ``_bucket``/``_sum``/``_count``)."""
    out: dict[str, set[str]] = {}
    for family in registry.collect():
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}.get(family.type, ())
        out[family.name] = {
            family.name,
            *(family.name + s for s in suffixes),
            *(s.name for s in family.samples),
        }
        out[family.name].discard(family.name + "_created")
    return out


def _primary(registry: CollectorRegistry) -> dict[str, str]:
    """Family -> the name the reference lists it under (a counter's ``_total`` series)."""
    return {f.name: f.name + "_total" if f.type == "counter" else f.name for f in registry.collect()}


def test_every_metric_is_documented_and_every_documented_metric_exists() -> None:
    registry = _registry()
    text = _doc("metrics.md")
    rows = {t for _h, rs in _tables(text) for r in rs for t in _ticked(r[0])}
    globs = [t[:-1] for t in _ticked(text) if t.endswith("*")]
    ticked = {t.split("{")[0] for t in _ticked(text)}
    primary = _primary(registry)
    assert "inferencecache_template_warmups" in primary and "inferencecache_kv_events" in primary
    missing = []
    for name in primary.values():
        if name.startswith("inferencecache_"):
            ok = name in rows
        else:
            ok = name in ticked or any(name.startswith(g) for g in globs)
        if not ok:
            missing.append(name)
    assert not missing, _missing("metrics not documented (a table row of docs/metrics.md)", missing)
    exposed = set().union(*_exposed(registry).values())
    stale = set()
    for name, glob in re.findall(r"(inferencecache_[a-z0-9_]*)(\*?)", " ".join(_ticked(text))):
        if not (any(e.startswith(name) for e in exposed) if glob else name in exposed):
            stale.add(name + glob)
    assert not stale, _missing("documented metrics that no longer exist", stale)


# -- reason codes ----------------------------------------------------------------------------


def _lookup_codes() -> set[str]:
    """LookupRoute/RenderTemplate codes: hash-keyed strategies and ``grpc_api``'s own
    constants (module-level ``NAME = "NAME"`` strings)."""
    consts = {v for k, v in vars(grpc_api).items() if isinstance(v, str) and k == v}
    return {s.value for s in index_types.Strategy} | consts


def test_every_reason_code_is_documented_and_every_documented_code_exists() -> None:
    text = _doc("reason-codes.md")
    codes = _lookup_codes()
    assert {"PREFIX_MATCH", "LEAST_LOADED", "RENDER_ERROR", "UNKNOWN_TENANT"} <= codes
    tables = [(h, rows) for h, rows in _tables(text)]
    documented = {t for h, rows in tables if h[0] == "code" for r in rows for t in _ticked(r[0])}
    assert not codes - documented, _missing("reason codes not documented", codes - documented)
    assert not documented - codes, _missing(
        "documented reason codes that no longer exist", documented - codes
    )


def _error_rows(text: str) -> dict[str, list[str]]:
    section = _section(text, lambda h: "ext_proc errors" in h)
    (rows,) = [rows for h, rows in _tables(section) if h[0] == "kind"]
    return {_ticked(r[0])[0]: r for r in rows}


def test_every_extproc_error_kind_is_documented_with_its_status_type_and_code() -> None:
    text = _doc("reason-codes.md")
    rows = _error_rows(text)
    kinds = {k.value: k for k in picking.ErrorKind}
    assert not kinds.keys() - rows.keys(), _missing(
        "ext_proc error kinds not documented", kinds.keys() - rows.keys()
    )
    assert not rows.keys() - kinds.keys(), _missing(
        "documented error kinds that no longer exist", rows.keys() - kinds.keys()
    )
    wrong = []
    for value, kind in kinds.items():
        status, type_, code = picking.ERRORS[kind]
        want = [str(status), f"`{type_}`", f"`{code}`" if code else "`null`"]
        if rows[value][1:4] != want:
            wrong.append(f"{value}: documented {rows[value][1:4]}, the code says {want}")
        details = protocol.immediate(picking.Rejection(kind, "x")).immediate_response.details
        if details != f"inference_cache_{value}":
            wrong.append(f"{value}: Envoy details {details!r}, documented as inference_cache_<kind>")
    assert not wrong, _missing("ext_proc error rows that disagree with picking.ERRORS", wrong)
    assert "`inference_cache_<kind>`" in text


def _constants(module: types.ModuleType, prefix: str) -> set[str]:
    return {v for k, v in vars(module).items() if k.startswith(prefix) and isinstance(v, str)}


def test_every_label_value_the_code_defines_is_in_its_metric_row() -> None:
    """Label values defined as enums or constants appear in their metric's row of
    ``docs/metrics.md`` (label or meaning column)."""
    rows = {t: " ".join(r[1:]) for _h, rs in _tables(_doc("metrics.md")) for r in rs for t in _ticked(r[0])}
    expected = {
        "inferencecache_extproc_decisions_total": _constants(picker, "MATCH_"),
        "inferencecache_byte_match_fallbacks_total": _constants(picker, "FALLBACK_"),
        "inferencecache_matching_mode": _constants(picker, "MODE_") | set(config_mod.MATCHING_MODES),
        "inferencecache_template_warmups_total": _constants(warmup, "RESULT_"),
        "inferencecache_snapshot_auth_total": {r.value for r in auth.AuthResult},
        "inferencecache_producer_auth_total": {r.value for r in auth.AuthResult},
        "inferencecache_extproc_requests_total": {m.value for m in protocol.Mode}
        | {k.value for k in picking.ErrorKind},
    }
    missing = []
    for name, values in expected.items():
        assert values, name
        described = set(_ticked(rows[name]))
        missing += [f"{name}: {v}" for v in sorted(values - described)]
    assert not missing, _missing("label values not documented in their metric's row", missing)


def test_every_grpc_status_the_api_returns_is_documented() -> None:
    """The statuses ``grpc_api`` sets (read from its source: they are inline arguments) are
    the rows of the gRPC status table, both ways."""
    source = Path(grpc_api.__file__).read_text(encoding="utf-8")
    used = set(re.findall(r"grpc\.StatusCode\.([A-Z_]+)", source))
    assert "UNIMPLEMENTED" in used
    section = _section(_doc("reason-codes.md"), lambda h: h == "gRPC status codes")
    (rows,) = [rows for h, rows in _tables(section) if h[0] == "status"]
    documented = {t for r in rows for t in _ticked(r[0])}
    assert not used - documented, _missing("gRPC statuses not documented", used - documented)
    assert not documented - used, _missing(
        "documented gRPC statuses the API never returns", documented - used
    )
