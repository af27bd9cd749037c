"""``config/prometheus``: the ServiceMonitor, the PodMonitor and the PrometheusRules validate
against prometheus-operator's own CRDs, and every rule's PromQL parses and names only series
and labels the server (first PrometheusRule) or the operator (second) really exports.

Owner: tests of ``config/`` (issue #7). Place in the flow: ``kubectl kustomize
config/prometheus`` as the user applies it. ``test_schemas.py`` validates its
``monitoring.coreos.com`` objects with :func:`crd_validate.validate` against the CRDs
vendored verbatim from prometheus-operator (:data:`CRD_FILES`,
``tests/data/prometheus-operator-crds/``, see its README); here, that the vendored files
are that release and that the validation refuses broken objects. Each rule's ``expr`` is parsed
by ``promql_parser`` (the Rust promql-parser crate) and its AST walked: every vector
selector must name a series of the registry ``/metrics`` serves (a ``Server`` built, not
started, as in ``test_docs_reference``; for the operator's rules an ``OperatorMetrics``), a
target series (``up``) or a recording rule of the same object; every matcher,
``by``/``without``/``on``/``ignoring`` label, ``le`` bound and ``$labels.x`` of an annotation
must exist where it is used. The labels Prometheus adds to every scraped series are
:data:`TARGET_LABELS` (ServiceMonitor) and :data:`POD_TARGET_LABELS` (PodMonitor).
The operator's series table (docs/operator.md "Metrics") lists exactly the operator registry's families.

Not checked: that a Prometheus evaluates the rules (no Prometheus here), thresholds, and
PromQL semantics beyond label flow (e.g. that a ratio is a ratio).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import promql_parser as pq
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.utils import floatToGoString

from inference_cache.operator.metrics import OperatorMetrics

from ..operator import crd_validate
from ..test_docs_reference import _registry, _section, _tables, _ticked
from . import manifests

CRDS = manifests.REPO / "tests" / "data" / "prometheus-operator-crds"
#: The prometheus-operator release the vendored CRDs come from (their README says the same).
OPERATOR_VERSION = "0.93.0"
CRD_FILES = {
    "ServiceMonitor": CRDS / "monitoring.coreos.com_servicemonitors.yaml",
    "PodMonitor": CRDS / "monitoring.coreos.com_podmonitors.yaml",
    "PrometheusRule": CRDS / "monitoring.coreos.com_prometheusrules.yaml",
}
#: Labels every series scraped through a ServiceMonitor carries: the relabelings
#: prometheus-operator generates for a ServiceMonitor endpoint (v0.93.0,
#: ``pkg/prometheus/promcfg.go``: namespace, service, pod, container, job, endpoint) and
#: Prometheus's own ``instance``.
TARGET_LABELS = frozenset({"namespace", "service", "pod", "container", "job", "endpoint", "instance"})
#: The same for a PodMonitor endpoint (``generatePodMonitorConfig``: no ``service``).
POD_TARGET_LABELS = TARGET_LABELS - {"service"}
#: The scrape object of each PrometheusRule (by ``app.kubernetes.io/component``) and the
#: labels its targets carry.
COMPONENTS = {"server": ("ServiceMonitor", TARGET_LABELS), "operator": ("PodMonitor", POD_TARGET_LABELS)}
SEVERITIES = {"warning", "critical"}
DOCS = manifests.REPO / "docs"


# -- the objects -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def monitoring(kustomize: Callable[[str], str]) -> list[dict[str, Any]]:
    """The ``monitoring.coreos.com`` objects of ``kubectl kustomize config/prometheus``."""
    objs = manifests.parse(kustomize("prometheus"))
    return [o for o in objs if manifests.group_of(o) == "monitoring.coreos.com"]


def _component(obj: dict[str, Any]) -> str:
    return str(obj["metadata"]["labels"]["app.kubernetes.io/component"])


@pytest.fixture(scope="module")
def rule_objects(monitoring: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Component (``server``, ``operator``) -> its PrometheusRule."""
    objs = list(manifests.of_kind(monitoring, "PrometheusRule"))
    by_component = {_component(o): o for o in objs}
    assert len(by_component) == len(objs)
    return by_component


def _rules(rule_object: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for group in rule_object["spec"]["groups"]:
        yield from group["rules"]


def _name(rule: dict[str, Any]) -> str:
    return str(rule.get("alert") or rule["record"])


# -- schema ------------------------------------------------------------------------------------


def test_the_overlay_adds_a_monitor_and_a_prometheus_rule_per_component(
    monitoring: list[dict[str, Any]],
) -> None:
    assert sorted((_component(o), o["kind"]) for o in monitoring) == [
        ("operator", "PodMonitor"),
        ("operator", "PrometheusRule"),
        ("server", "PrometheusRule"),
        ("server", "ServiceMonitor"),
    ]


@pytest.mark.parametrize("kind", sorted(CRD_FILES))
def test_the_vendored_crds_are_the_named_release_and_fully_evaluable(kind: str) -> None:
    crd = crd_validate.load_crd(CRD_FILES[kind])
    assert crd["spec"]["names"]["kind"] == kind
    assert crd["metadata"]["annotations"]["operator.prometheus.io/version"] == OPERATOR_VERSION
    assert f"v{OPERATOR_VERSION}" in (CRDS / "README.md").read_text()
    assert crd_validate.unevaluable_rules(crd) == {}


@pytest.mark.parametrize(
    ("kind", "path", "value"),
    [
        ("PrometheusRule", ("spec", "groups", 0, "rules", 0, "for"), "5 minutes"),
        ("PrometheusRule", ("spec", "groups", 0, "rules", 0, "severity"), "warning"),
        ("ServiceMonitor", ("spec", "endpoints", 0, "interval"), "30 seconds"),
        ("ServiceMonitor", ("spec", "endpoints", 0, "prot"), "http"),
        ("PodMonitor", ("spec", "podMetricsEndpoints", 0, "interval"), "30 seconds"),
        ("PodMonitor", ("spec", "podMetricsEndpoints", 0, "prot"), "health"),
    ],
)
def test_the_validation_rejects_a_broken_object(
    kind: str, path: tuple[str | int, ...], value: str, monitoring: list[dict[str, Any]]
) -> None:
    obj = next(manifests.of_kind(monitoring, kind))
    broken = copy.deepcopy(obj)
    parent = broken
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    assert crd_validate.validate(broken, crd_validate.load_crd(CRD_FILES[kind])) != []


def _job(objs: list[dict[str, Any]], component: str) -> str:
    """The ``job`` prometheus-operator gives the targets of ``component``'s scrape object:
    a ServiceMonitor's the Service's name, a PodMonitor's ``<namespace>/<name>`` (v0.93.0,
    ``pkg/prometheus/promcfg.go``), neither with ``jobLabel`` set."""
    kind, _labels = COMPONENTS[component]
    (monitor,) = [m for m in manifests.of_kind(objs, kind) if _component(m) == component]
    assert "jobLabel" not in monitor["spec"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    if kind == "PodMonitor":
        (deployment,) = [
            d
            for d in manifests.of_kind(objs, "Deployment")
            if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        ports = {p["name"] for c in deployment["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
        assert {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]} <= ports
        return f"{monitor['metadata']['namespace']}/{monitor['metadata']['name']}"
    (service,) = [
        s
        for s in manifests.of_kind(objs, "Service")
        if selector.items() <= s["metadata"].get("labels", {}).items()
    ]
    return str(service["metadata"]["name"])


@pytest.mark.parametrize("component", sorted(COMPONENTS))
def test_the_rules_select_the_job_their_monitor_scrapes(
    kustomize: Callable[[str], str], rule_objects: dict[str, dict[str, Any]], component: str
) -> None:
    objs = manifests.parse(kustomize("prometheus"))
    rule_object = rule_objects[component]
    jobs = {
        m.value for rule in _rules(rule_object) for m in _matchers(pq.parse(rule["expr"])) if m.name == "job"
    }
    assert jobs == {_job(objs, component)}
    (monitor,) = [m for m in manifests.of_kind(objs, COMPONENTS[component][0]) if _component(m) == component]
    assert rule_object["metadata"]["namespace"] == monitor["metadata"]["namespace"]
    assert rule_object["metadata"]["labels"] == monitor["metadata"]["labels"]


# -- the series the server exports ---------------------------------------------------------


class Series:
    """What one exposed series name carries: its label names and, for ``_bucket``, the
    ``le`` values."""

    def __init__(self, labels: frozenset[str], buckets: frozenset[str] = frozenset()) -> None:
        self.labels = labels
        self.buckets = buckets


def exported_series(
    registry: CollectorRegistry, target_labels: frozenset[str] = TARGET_LABELS
) -> dict[str, Series]:
    """Every series name ``registry`` exposes -> its labels (target labels included): a
    counter's ``_total``, a histogram's ``_bucket``/``_sum``/``_count``, a gauge's name.
    Label names come from the metric objects and the collectors' families, so series no
    request has created yet count too."""
    out: dict[str, Series] = {}

    def add(name: str, type_: str, labels: frozenset[str], buckets: frozenset[str]) -> None:
        labels |= target_labels
        if type_ == "counter":
            out[name + "_total"] = Series(labels)
        elif type_ == "histogram":
            out[name + "_bucket"] = Series(labels | {"le"}, buckets)
            out[name + "_sum"] = out[name + "_count"] = Series(labels)
        else:
            out[name] = Series(labels)

    for collector in list(registry._collector_to_names):
        if isinstance(collector, MetricWrapperBase):
            bounds = getattr(collector, "_upper_bounds", ())
            add(
                collector._name,
                collector._type,
                frozenset(collector._labelnames),
                frozenset(floatToGoString(b) for b in bounds),
            )
            continue
        for family in collector.collect():
            labels = frozenset(getattr(family, "_labelnames", ())).union(*(s.labels for s in family.samples))
            add(family.name, family.type, labels, frozenset())
    return out


def _known_series(component: str, rule_object: dict[str, Any]) -> dict[str, Series]:
    """``component``'s series, the target series (``up``), and the object's recording rules."""
    target_labels = COMPONENTS[component][1]
    registry = _registry() if component == "server" else OperatorMetrics().registry
    known = exported_series(registry, target_labels)
    known["up"] = Series(target_labels)
    for rule in _rules(rule_object):
        if "record" in rule:
            errors: list[str] = []
            known[rule["record"]] = Series(labels_of(pq.parse(rule["expr"]), known, errors))
            assert errors == [], rule["record"]
    return known


@pytest.fixture(scope="module")
def all_series(rule_objects: dict[str, dict[str, Any]]) -> dict[str, dict[str, Series]]:
    return {component: _known_series(component, obj) for component, obj in rule_objects.items()}


@pytest.fixture(scope="module")
def series(all_series: dict[str, dict[str, Series]]) -> dict[str, Series]:
    """The server's series (the PromQL checks' own tests use them)."""
    return all_series["server"]


def test_the_series_model_knows_counters_histograms_and_scrape_time_families() -> None:
    known = exported_series(_registry())
    assert known["inferencecache_extproc_decisions_total"].labels >= {"model", "match", "pod"}
    assert "inferencecache_extproc_decisions" not in known
    assert known["inferencecache_gc_pause_seconds_bucket"].labels >= {"generation", "le"}
    assert "0.05" in known["inferencecache_gc_pause_seconds_bucket"].buckets
    assert "le" not in known["inferencecache_gc_pause_seconds_count"].labels
    assert known["inferencecache_matching_mode"].labels >= {"model", "requested", "mode"}
    assert known["inferencecache_kv_event_resyncs_total"].labels == TARGET_LABELS


# -- PromQL label flow -----------------------------------------------------------------------


def _matchers(expr: pq.Expr) -> list[pq.Matcher]:
    found: list[pq.Matcher] = []

    def visit(node: pq.Expr) -> None:
        if isinstance(node, pq.VectorSelector):
            found.extend(node.matchers.matchers)
            found.extend(m for group in node.matchers.or_matchers for m in group)

    pq.walk(expr, visit)
    return found


def _check_subset(what: str, labels: list[str], available: frozenset[str], errors: list[str]) -> None:
    if missing := sorted(set(labels) - available):
        errors.append(f"{what}: {missing} not among {sorted(available)}")


def _is_scalar(node: pq.Expr) -> bool:
    while isinstance(node, (pq.ParenExpr, pq.UnaryExpr)):
        node = node.expr
    return isinstance(node, pq.NumberLiteral)


def labels_of(node: pq.Expr, series: dict[str, Series], errors: list[str]) -> frozenset[str]:
    """The label names ``node``'s result can carry; every use of a label or series that
    does not exist is appended to ``errors``."""
    if isinstance(node, pq.VectorSelector):
        known = series.get(node.name or "")
        if known is None:
            errors.append(f"{node.name}: not a series the server exports")
            return frozenset()
        for m in [*node.matchers.matchers, *(m for g in node.matchers.or_matchers for m in g)]:
            _check_subset(f"{node} matcher", [m.name], known.labels | {"__name__"}, errors)
            if m.name == "le" and m.value not in known.buckets:
                errors.append(f"{node}: le={m.value!r} is not a bucket bound {sorted(known.buckets)}")
        return known.labels
    if isinstance(node, pq.MatrixSelector):
        return labels_of(node.vector_selector, series, errors)
    if isinstance(node, (pq.ParenExpr, pq.UnaryExpr, pq.SubqueryExpr)):
        return labels_of(node.expr, series, errors)
    if isinstance(node, (pq.NumberLiteral, pq.StringLiteral)):
        return frozenset()
    if isinstance(node, pq.AggregateExpr):
        inner = labels_of(node.expr, series, errors)
        if node.modifier is None:
            return frozenset()
        _check_subset(f"{node.op} by/without", node.modifier.labels, inner, errors)
        if node.modifier.type == pq.AggModifierType.By:
            return frozenset(node.modifier.labels)
        return inner - set(node.modifier.labels)
    if isinstance(node, pq.Call):
        args = [labels_of(a, series, errors) for a in node.args]
        name = node.func.name
        if name == "histogram_quantile":
            _check_subset("histogram_quantile", ["le"], args[1], errors)
            return args[1] - {"le"}
        if name == "absent":
            return frozenset(m.name for m in _matchers(node.args[0]) if m.op == pq.MatchOp.Equal)
        if name in {"rate", "increase", "irate", "delta", "deriv", "abs", "clamp_min", "clamp_max"}:
            return args[0]
        errors.append(f"{name}(): label flow not modelled here")
        return frozenset()
    if isinstance(node, pq.BinaryExpr):
        lhs = labels_of(node.lhs, series, errors)
        rhs = labels_of(node.rhs, series, errors)
        if _is_scalar(node.lhs) or _is_scalar(node.rhs):
            return rhs if _is_scalar(node.lhs) else lhs
        matching = node.modifier.matching if node.modifier else None
        if matching is not None:
            _check_subset(f"{node.op} on/ignoring (left)", matching.labels, lhs, errors)
            _check_subset(f"{node.op} on/ignoring (right)", matching.labels, rhs, errors)
        elif str(node.op) not in {"and", "or", "unless"} and lhs != rhs:
            errors.append(f"{node.op} without on(): the sides carry {sorted(lhs)} and {sorted(rhs)}")
        return lhs & rhs if str(node.op) == "or" else lhs
    errors.append(f"{type(node).__name__}: not modelled here")
    return frozenset()


def check(expr: str, series: dict[str, Series]) -> tuple[frozenset[str], list[str]]:
    """(the labels of ``expr``'s result, every unknown series or label it uses)."""
    errors: list[str] = []
    labels = labels_of(pq.parse(expr), series, errors)
    return labels, errors


def _rule_params(path: Path) -> list[tuple[str, str]]:
    objs = [o for o in manifests.parse(path.read_text()) if o["kind"] == "PrometheusRule"]
    return [(_component(o), _name(r)) for o in objs for r in _rules(o)]


RULE_NAMES = _rule_params(manifests.CONFIG / "prometheus" / "rules.yaml")


def _rule(rule_object: dict[str, Any], name: str) -> dict[str, Any]:
    (only,) = [r for r in _rules(rule_object) if _name(r) == name]
    return only


def test_rule_names_are_unique(rule_objects: dict[str, dict[str, Any]]) -> None:
    names = [_name(r) for obj in rule_objects.values() for r in _rules(obj)]
    assert len(names) == len(set(names)) > 10
    assert {c for c, _ in RULE_NAMES} == set(COMPONENTS)


@pytest.mark.parametrize(("component", "name"), RULE_NAMES)
def test_the_expression_uses_only_exported_series_and_labels(
    component: str,
    name: str,
    rule_objects: dict[str, dict[str, Any]],
    all_series: dict[str, dict[str, Series]],
) -> None:
    rule = _rule(rule_objects[component], name)
    labels, errors = check(rule["expr"], all_series[component])
    assert errors == []
    assert labels, "the result carries no label to tell its alerts apart"
    used = set(re.findall(r"\$labels\.(\w+)", " ".join(rule.get("annotations", {}).values())))
    assert used <= labels, f"annotations use labels the expression drops: {sorted(used - labels)}"


@pytest.mark.parametrize(
    ("expr", "why"),
    [
        ("inferencecache_server_upp == 0", "inferencecache_server_upp: not a series"),
        ("rate(inferencecache_extproc_decisions[5m])", "inferencecache_extproc_decisions: not a series"),
        ("inferencecache_gc_pause_seconds{generation='2'}", "inferencecache_gc_pause_seconds: not a series"),
        ('rate(inferencecache_extproc_decision_seconds_count{model="m"}[5m])', "['model'] not among"),
        ("sum by (replica_id) (inferencecache_index_size_entries)", "['replica_id'] not among"),
        ('inferencecache_gc_pause_seconds_bucket{le="0.06"}', "le='0.06' is not a bucket bound"),
        ("histogram_quantile(0.99, rate(inferencecache_gc_pause_seconds_sum[5m]))", "['le'] not among"),
        (
            "inferencecache_endpoint_ready and on (model) inferencecache_matching_mode",
            "on/ignoring (left): ['model']",
        ),
        (
            "sum by (pod) (inferencecache_index_size_entries) / inferencecache_index_distinct_keys",
            "without on()",
        ),
    ],
)
def test_the_check_catches_a_wrong_series_or_label(expr: str, why: str, series: dict[str, Series]) -> None:
    _labels, errors = check(expr, series)
    assert any(why in e for e in errors), errors


def test_annotations_may_not_use_a_label_the_expression_drops(series: dict[str, Series]) -> None:
    labels, errors = check("sum by (pod) (inferencecache_extproc_decisions_total)", series)
    assert errors == [] and "model" not in labels


def test_an_expression_that_does_not_parse_is_refused() -> None:
    with pytest.raises(ValueError):
        pq.parse("rate(inferencecache_kv_events_total[5m]")


# -- alert conventions -----------------------------------------------------------------------


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation but ``-``/``_`` dropped, spaces ->
    ``-``."""
    return {
        re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        for m in re.finditer(r"^#+ (.*)$", markdown, flags=re.M)
    }


@pytest.mark.parametrize(("component", "name"), RULE_NAMES)
def test_every_alert_has_for_severity_summary_description_and_a_real_runbook(
    component: str, name: str, rule_objects: dict[str, dict[str, Any]]
) -> None:
    rule = _rule(rule_objects[component], name)
    if "record" in rule:
        assert re.fullmatch(r"inferencecache:[a-z0-9_]+:[a-z0-9_]+", rule["record"])
        assert set(rule) == {"record", "expr"}
        return
    assert re.fullmatch(r"InferenceCache[A-Z][A-Za-z0-9]+", name)
    assert rule["for"]
    assert rule["labels"]["severity"] in SEVERITIES
    annotations = rule["annotations"]
    assert set(annotations) == {"summary", "description", "runbook_url"}
    assert len(annotations["description"]) > len(annotations["summary"]) > 20
    doc, _, anchor = annotations["runbook_url"].partition("#")
    assert doc.startswith("docs/") and (manifests.REPO / doc).is_file()
    assert anchor in _anchors((manifests.REPO / doc).read_text())


def test_the_anchor_check_knows_github_slugs() -> None:
    assert _anchors("## Endpoint picker (`ext_proc`, pushed)\n### Fail-open, and what") == {
        "endpoint-picker-ext_proc-pushed",
        "fail-open-and-what",
    }


def test_the_alerts_table_of_the_metrics_reference_lists_every_alert(
    rule_objects: dict[str, dict[str, Any]],
) -> None:
    text = _section((DOCS / "metrics.md").read_text(encoding="utf-8"), lambda h: h == "Alerts")
    ((header, rows),) = list(_tables(text))
    assert header[:2] == ["alert", "severity"]
    documented = {_ticked(r[0])[0]: r[1] for r in rows}
    shipped = {
        _name(r): r["labels"]["severity"]
        for obj in rule_objects.values()
        for r in _rules(obj)
        if "alert" in r
    }
    assert documented == shipped


def test_the_operator_series_table_lists_exactly_the_operator_registry() -> None:
    """docs/operator.md "Metrics": one row per ``inferencecache_operator_*`` family under its
    exposed name (counters with ``_total``), and no row for a family that does not exist."""
    text = _section((DOCS / "operator.md").read_text(encoding="utf-8"), lambda h: h == "Metrics")
    ((header, rows),) = list(_tables(text))
    assert header[:2] == ["name", "type"]
    documented = {_ticked(r[0])[0]: r[1] for r in rows}
    exported = {
        f.name + ("_total" if f.type == "counter" else ""): f.type
        for f in OperatorMetrics().registry.collect()
        if f.name.startswith("inferencecache_operator_")
    }
    assert documented == exported
