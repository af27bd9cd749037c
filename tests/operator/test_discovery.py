"""Engine endpoint discovery for ``serve`` (``inference_cache.operator.discovery``).

We test which pods become endpoints (namespace, selector, Ready, IP), one endpoint per
target port with the data-parallel rank offsetting the KV-event and replay ports, IPv6
bracketing, tenant = namespace, model = ``gateway.modelName``, and that the result is
validated by ``inference_cache.config.validate`` (an unknown model is a ``ConfigError``).
Nothing is mocked.
"""

from __future__ import annotations

from typing import Any

import pytest

from inference_cache import config
from inference_cache.operator import crds, discovery

from . import crd_validate as cv

SERVE = config.Config(models=(config.ModelConfig(name="qwen"),))


def backend(gateway: dict[str, Any] | None = None, namespace: str = "llm", **spec: Any) -> dict[str, Any]:
    return {
        "kind": "CacheBackend",
        "metadata": {"namespace": namespace, "name": "cache"},
        "spec": {
            "type": "None",
            "engineSelector": {"matchLabels": {"app": "vllm"}},
            "gateway": {"modelName": "qwen", **(gateway or {})},
            **spec,
        },
    }


def pod(
    name: str,
    ip: str | None,
    *,
    ready: bool = True,
    namespace: str = "llm",
    labels: dict[str, str] | None = None,
    deleting: bool = False,
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "labels": {"app": "vllm"} if labels is None else labels,
    }
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    status: dict[str, Any] = {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}
    if ip:
        status["podIP"] = ip
    return {"metadata": meta, "status": status}


def test_one_endpoint_per_ready_pod_and_rank() -> None:
    pods = [pod("vllm-1", "10.0.0.8"), pod("vllm-0", "10.0.0.7")]
    b = backend({"targetPorts": [{"number": 8000}, {"number": 8001}]})
    assert cv.validate({**b, "apiVersion": "inferencecache.io/v1alpha1"}, crds.cache_backend()) == []
    eps = discovery.discover_endpoints(b, pods, SERVE)
    assert eps == [
        config.EndpointConfig(
            address="10.0.0.7:8000",
            model="qwen",
            tenant="llm",
            kv_events="tcp://10.0.0.7:5557",
            replay="tcp://10.0.0.7:5657",
            metrics_url="http://10.0.0.7:8000/metrics",
        ),
        config.EndpointConfig(
            address="10.0.0.7:8001",
            model="qwen",
            tenant="llm",
            kv_events="tcp://10.0.0.7:5558",
            replay="tcp://10.0.0.7:5658",
            metrics_url="http://10.0.0.7:8001/metrics",
        ),
        config.EndpointConfig(
            address="10.0.0.8:8000",
            model="qwen",
            tenant="llm",
            kv_events="tcp://10.0.0.8:5557",
            replay="tcp://10.0.0.8:5657",
            metrics_url="http://10.0.0.8:8000/metrics",
        ),
        config.EndpointConfig(
            address="10.0.0.8:8001",
            model="qwen",
            tenant="llm",
            kv_events="tcp://10.0.0.8:5558",
            replay="tcp://10.0.0.8:5658",
            metrics_url="http://10.0.0.8:8001/metrics",
        ),
    ]


@pytest.mark.parametrize(
    ("p", "included"),
    [
        pytest.param(pod("a", "10.0.0.7"), True, id="ready"),
        pytest.param(pod("a", "10.0.0.7", ready=False), False, id="not-ready"),
        pytest.param(pod("a", "10.0.0.7", deleting=True), False, id="terminating"),
        pytest.param(pod("a", None), False, id="no-ip"),
        pytest.param(pod("a", "10.0.0.7", namespace="other"), False, id="other-namespace"),
        pytest.param(pod("a", "10.0.0.7", labels={"app": "sglang"}), False, id="selector-mismatch"),
        pytest.param(pod("a", "10.0.0.7", labels={"app": "vllm", "extra": "x"}), True, id="selector-subset"),
    ],
)
def test_which_pods_count(p: dict[str, Any], included: bool) -> None:
    eps = discovery.discover_endpoints(backend(), [p], SERVE)
    assert [e.address for e in eps] == (["10.0.0.7:8000"] if included else [])


@pytest.mark.parametrize(
    ("gateway", "spec"),
    [
        pytest.param({"modelName": ""}, {}, id="no-model-name"),
        pytest.param({}, {"engineSelector": {"matchLabels": {}}}, id="empty-selector"),
    ],
)
def test_backends_that_serve_nothing_through_us(gateway: dict[str, Any], spec: dict[str, Any]) -> None:
    assert discovery.discover_endpoints(backend(gateway, **spec), [pod("a", "10.0.0.7")], SERVE) == []


def test_ipv6_and_engine() -> None:
    (ep,) = discovery.discover_endpoints(
        backend({"targetPorts": [9000]}, integration={"engine": "SGLang"}), [pod("a", "fd00::7")], SERVE
    )
    assert (ep.address, ep.kv_events, ep.replay, ep.engine) == (
        "[fd00::7]:9000",
        "tcp://[fd00::7]:5557",
        "tcp://[fd00::7]:5657",
        "sglang",
    )


@pytest.mark.parametrize(
    ("serve", "b", "message"),
    [
        pytest.param(SERVE, backend({"modelName": "llama"}), "unknown model 'llama'", id="unknown-model"),
        pytest.param(
            config.Config(
                models=SERVE.models,
                endpoints=(config.EndpointConfig(address="10.0.0.7:8000", model="qwen", tenant="llm"),),
            ),
            backend(),
            "already endpoints",
            id="duplicate-address",
        ),
        pytest.param(
            SERVE, backend(integration={"engine": "trt"}), "not one of vllm, sglang", id="unknown-engine"
        ),
    ],
)
def test_results_are_validated(serve: config.Config, b: dict[str, Any], message: str) -> None:
    with pytest.raises(config.ConfigError, match=message):
        discovery.discover_endpoints(b, [pod("a", "10.0.0.7")], serve)
