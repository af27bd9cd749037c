"""``inference-cache bench routing``: every router on the same workload, seed and simulated
fleet, one table (and ``--json OUT``: a top-level array, one object per router).

Owner: ``inference_cache.routesim``. Registered by ``inference_cache.cli``. Place in the flow::

    trace.load_mooncake / trace.generate --> Workload
        --sim.simulate x every router (routers.factories)--> RunResult
        --report()--> rows (the JSON keys of issue #6) --> markdown table, JSON

Columns: token hit ratio (cached prompt tokens at schedule time / prompt tokens), the same over
the infinite-cache bound and over a pooled LRU of ``replicas x capacity`` (a reference, not a
bound), TTFT mean/p90/p99 in virtual seconds and p90 over round robin's, ``imbalance_max_mean``
= max / mean of the prompt tokens each replica computed, and the wall time of each decision
(``decision_us_p50/p99``: the router's decide function only, in process).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from inference_cache.extproc import scoring
from inference_cache.routesim import routers, sim, trace
from inference_cache.routesim.engine import EngineSettings

#: Where the Mooncake conversation trace lives beside a clone (``../shared``).
DEFAULT_TRACE = Path("../shared/data/traces/mooncake_conversation_trace.jsonl")

KEYS = (
    "router",
    "workload",
    "replicas",
    "capacity_tokens",
    "seed",
    "hit_ratio",
    "hit_over_infinite",
    "hit_over_pooled_lru",
    "ttft_mean_s",
    "ttft_p90_s",
    "ttft_p99_s",
    "ratio_ttft_p90_to_round_robin",
    "imbalance_max_mean",
    "decision_us_p50",
    "decision_us_p99",
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--workload",
        choices=trace.WORKLOADS,
        default="mooncake",
        help="mooncake (replays --trace, the default) or a generated workload",
    )
    p.add_argument("--trace", type=Path, default=DEFAULT_TRACE, help="Mooncake FAST'25 JSONL")
    p.add_argument(
        "--block-tokens",
        type=int,
        default=trace.MOONCAKE_BLOCK_TOKENS,
        help="engine block size for --workload mooncake (divides 512; each hash_id is split)",
    )
    p.add_argument("--replicas", type=int, default=8, help="simulated replicas (default 8)")
    p.add_argument("--capacity-tokens", type=int, default=300_000, help="KV cache per replica")
    p.add_argument("--speedup", type=float, default=1.0, help="arrival times divided by this")
    p.add_argument("--seed", type=int, default=0, help="random seed of the routers and generated workloads")
    p.add_argument("--limit", type=int, default=None, help="first N requests only")
    p.add_argument("--routers", default="", help="comma-separated subset (default: all)")
    p.add_argument("--dynamo-weights", default="1,4", help="overlap weights of dynamo_w{N}")
    p.add_argument("--event-delay-ms", type=float, default=50.0, help="KV event delivery lag")
    p.add_argument("--event-drop", type=float, default=0.001, help="probability a KV event batch is lost")
    p.add_argument("--scrape-interval-ms", type=float, default=50.0, help="engine gauge scrape period")
    p.add_argument(
        "--json", type=Path, default=None, metavar="OUT", help="also write one object per router as JSON"
    )


def load_workload(args: argparse.Namespace) -> trace.Workload:
    if args.workload == "mooncake":
        return trace.load_mooncake(
            args.trace, limit=args.limit, speedup=args.speedup, block_tokens=args.block_tokens
        )
    return trace.generate(args.workload, args.seed, limit=args.limit, speedup=args.speedup)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1), linear between order statistics."""
    if not values:
        return 0.0
    if len(values) == 1:
        return float(values[0])
    return statistics.quantiles(values, n=1000, method="inclusive")[round(q * 1000) - 1]


def report(
    name: str,
    result: sim.RunResult,
    *,
    workload: trace.Workload,
    replicas: int,
    capacity_tokens: int,
    seed: int,
    infinite: float,
    pooled: float,
) -> dict[str, Any]:
    """One router's row (``ratio_ttft_p90_to_round_robin`` is filled by :func:`compare`)."""
    work = result.prefill_tokens
    mean_work = sum(work) / len(work) if work else 0.0
    us = [ns / 1000.0 for ns in result.decision_ns]
    return {
        "router": name,
        "workload": workload.name,
        "replicas": replicas,
        "capacity_tokens": capacity_tokens,
        "seed": seed,
        "hit_ratio": result.hit_ratio,
        "hit_over_infinite": result.hit_ratio / infinite if infinite else 0.0,
        "hit_over_pooled_lru": result.hit_ratio / pooled if pooled else 0.0,
        "ttft_mean_s": statistics.fmean(result.ttft_s) if result.ttft_s else 0.0,
        "ttft_p90_s": percentile(result.ttft_s, 0.90),
        "ttft_p99_s": percentile(result.ttft_s, 0.99),
        "ratio_ttft_p90_to_round_robin": None,
        "imbalance_max_mean": max(work) / mean_work if mean_work else 0.0,
        "decision_us_p50": percentile(us, 0.50),
        "decision_us_p99": percentile(us, 0.99),
    }


def compare(rows: list[dict[str, Any]]) -> None:
    """Fill ``ratio_ttft_p90_to_round_robin`` (``None`` without a round_robin row)."""
    rr = next((r for r in rows if r["router"] == "round_robin"), None)
    for r in rows:
        base = rr["ttft_p90_s"] if rr else 0.0
        r["ratio_ttft_p90_to_round_robin"] = r["ttft_p90_s"] / base if base else None


def run_all(
    workload: trace.Workload,
    *,
    replicas: int,
    engine: EngineSettings,
    signals: sim.Signals,
    seed: int,
    names: Sequence[str] = (),
    dynamo_weights: Sequence[float] = (1.0, 4.0),
) -> tuple[list[dict[str, Any]], dict[str, sim.RunResult]]:
    """Every router (or ``names``) on ``workload``: the rows and the raw results. ``ours``
    prices prefill at the simulated engine's rate (its ``prefill_tokens_per_s`` setting,
    as a deployment configures it for its hardware); everything else is its default."""
    settings = scoring.ScoringSettings(prefill_tokens_per_s=engine.prefill_tokens_per_s)
    table = routers.factories(dynamo_weights, settings)
    chosen = list(names) or list(table)
    unknown = [n for n in chosen if n not in table]
    if unknown:
        raise ValueError(f"unknown routers {unknown}; known: {list(table)}")
    infinite = sim.infinite_hit_ratio(workload)
    pooled = sim.pooled_lru_hit_ratio(workload, replicas * engine.capacity_tokens)
    rows, results = [], {}
    for name in chosen:
        # Earlier routers' garbage and the workload out of the cyclic GC, as `serve` freezes
        # its long-lived state: otherwise the later routers' decision p99 is GC pauses.
        gc.collect()
        gc.freeze()
        res = sim.simulate(
            workload, table[name], replicas=replicas, engine=engine, signals=signals, seed=seed
        )
        results[name] = res
        rows.append(
            report(
                name,
                res,
                workload=workload,
                replicas=replicas,
                capacity_tokens=engine.capacity_tokens,
                seed=seed,
                infinite=infinite,
                pooled=pooled,
            )
        )
    gc.unfreeze()
    compare(rows)
    return rows, results


def markdown(rows: Sequence[dict[str, Any]], results: dict[str, sim.RunResult]) -> str:
    head = (
        "| router | hit | hit/inf | hit/pooled LRU | TTFT mean s | TTFT p90 s | TTFT p99 s "
        "| p90/RR | imbalance | decide µs p50 | decide µs p99 | oversize | stalls |"
    )
    lines = [head, "|---" + "|---:" * 12 + "|"]
    for r in rows:
        ratio = r["ratio_ttft_p90_to_round_robin"]
        res = results[r["router"]]
        lines.append(
            f"| {r['router']} | {r['hit_ratio']:.3f} | {r['hit_over_infinite']:.3f} "
            f"| {r['hit_over_pooled_lru']:.3f} | {r['ttft_mean_s']:.3f} | {r['ttft_p90_s']:.3f} "
            f"| {r['ttft_p99_s']:.3f} | {'-' if ratio is None else f'{ratio:.3f}'} "
            f"| {r['imbalance_max_mean']:.3f} | {r['decision_us_p50']:.1f} | {r['decision_us_p99']:.1f} "
            f"| {res.oversize} | {res.stalls} |"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        workload = load_workload(args)
        engine = EngineSettings(capacity_tokens=args.capacity_tokens)
        signals = sim.Signals(args.event_delay_ms / 1000, args.event_drop, args.scrape_interval_ms / 1000)
        weights = [float(w) for w in args.dynamo_weights.split(",") if w.strip()]
        names = [n.strip() for n in args.routers.split(",") if n.strip()]
        if args.replicas <= 0 or args.speedup <= 0:
            raise ValueError("--replicas and --speedup must be > 0")
    except (OSError, ValueError, KeyError) as exc:
        print(f"bench routing: {exc}", file=sys.stderr)
        return 2
    start = time.monotonic()
    try:
        rows, results = run_all(
            workload,
            replicas=args.replicas,
            engine=engine,
            signals=signals,
            seed=args.seed,
            names=names,
            dynamo_weights=weights,
        )
    except ValueError as exc:
        print(f"bench routing: {exc}", file=sys.stderr)
        return 2
    elapsed = time.monotonic() - start
    print(
        f"workload {workload.name}: {len(workload.requests)} requests, "
        f"{workload.block_tokens}-token blocks, {args.replicas} replicas x {args.capacity_tokens} tokens, "
        f"speedup {args.speedup:g}, seed {args.seed}; "
        f"infinite-cache hit {sim.infinite_hit_ratio(workload):.3f}, "
        f"pooled LRU hit {sim.pooled_lru_hit_ratio(workload, args.replicas * args.capacity_tokens):.3f}; "
        f"{elapsed:.1f} s wall"
    )
    print(markdown(rows, results))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return 0
