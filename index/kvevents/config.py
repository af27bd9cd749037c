"""One engine endpoint to ingest KV events from.

Owner: ``inference_cache.index.kvevents``. Built by the server from its configuration
(or by the ``subscribe`` sidecar from flags) and handed to ``Subscriber`` and ``Mapper``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

Engine = Literal["vllm", "sglang"]


@dataclass(frozen=True, slots=True)
class EndpointConfig:
    #: The replica id: the engine's HTTP ``ip:port`` (what Envoy routes to).
    replica_id: str
    model: str
    #: Where the engine publishes, e.g. ``tcp://10.0.0.5:5557`` (the engine binds
    #: ``tcp://*:5557``), or where we bind when ``kv_events_bind``.
    kv_events: str
    tenant: str = ""
    #: The model's block size in tokens (our key granularity).
    block_size: int = 16
    #: True when the engine *connects* its PUB socket to us (we bind the SUB).
    kv_events_bind: bool = False
    #: The engine's replay ROUTER (``tcp://10.0.0.5:5558``); ``None``: no replay, a gap resyncs.
    replay: str | None = None
    #: ZMQ subscription prefix (vLLM/SGLang ``topic``; ``""`` = everything).
    topic: str = ""
    #: ``lora_id`` -> adapter name, for engines that publish only the id.
    lora_names: Mapping[int, str] = field(default_factory=dict)
    engine: Engine = "vllm"
    #: Data-parallel ranks published by this replica (vLLM internal DP load balancing):
    #: rank r publishes on the endpoint's TCP port + r (replay port + r), like vLLM's
    #: ``offset_endpoint_port``. All ranks feed the one ``replica_id``.
    data_parallel_size: int = 1

    def __post_init__(self) -> None:
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if self.data_parallel_size < 1:
            raise ValueError(f"data_parallel_size must be >= 1, got {self.data_parallel_size}")
        if self.data_parallel_size > 1:
            for ep in (self.kv_events, self.replay):
                if ep is not None and not ep.startswith("tcp://"):
                    raise ValueError(f"data parallel ranks need tcp:// endpoints (port offset), got {ep!r}")

    def rank_endpoints(self) -> list[tuple[int, str, str | None]]:
        """``(rank, kv_events, replay)`` for every rank of this replica."""
        return [
            (
                r,
                _offset_port(self.kv_events, r),
                None if self.replay is None else _offset_port(self.replay, r),
            )
            for r in range(self.data_parallel_size)
        ]


def _offset_port(endpoint: str, rank: int) -> str:
    if rank == 0:
        return endpoint
    base, _, port = endpoint.rpartition(":")
    try:
        return f"{base}:{int(port) + rank}"
    except ValueError as exc:
        raise ValueError(f"endpoint has no numeric port: {endpoint!r}") from exc
