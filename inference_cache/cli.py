"""The ``inference-cache`` console script: one entry point, one subcommand per job.

Each subcommand lives in the module that owns it and exposes two functions:
``add_arguments(parser)`` and ``run(args) -> int`` (the exit code). This module only
builds the parser from those owners and dispatches to the chosen one.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from types import ModuleType

#: subcommand -> (owning module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("inference_cache.extproc.serve", "run the index, the InferenceCache gRPC API and HTTP"),
    "subscribe": ("inference_cache.subscribe", "engine-pod sidecar: KV events and metrics to a server"),
    "fake-engine": ("inference_cache.fakeengine.main", "a simulated vLLM replica"),
    "operator": ("inference_cache.operator.main", "Kubernetes operator: reconcilers and admission webhooks"),
    "demo": ("inference_cache.demo", "fake engines, server and Envoy: cache-aware vs round robin"),
}

#: ``bench <name>`` -> (owning module, help)
BENCHES: dict[str, tuple[str, str]] = {
    "index": ("inference_cache.index.bench", "ingest and lookup throughput, memory per entry"),
    "routing": (
        "inference_cache.routesim.bench",
        "trace-replay simulation: routing quality of ours vs peer routers",
    ),
    "recovery": (
        "inference_cache.reliability",
        "recovery times after faults: engine restart, dropped batches, server restart, stall",
    ),
    "extproc": (
        "inference_cache.extproc.bench",
        "decision latency and requests/s of the ext_proc picker through a real Envoy",
    ),
    "live": (
        "inference_cache.livebench",
        "fake engines behind our Envoy + server, sglang-router, vllm-router and round robin",
    ),
}


def _load(module: str) -> ModuleType:
    return importlib.import_module(module)


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The whole parser; only the owner of the chosen subcommand (``argv[0]``, or
    ``bench argv[1]``) is imported, so one broken or heavy subcommand never slows or
    breaks another."""
    chosen = list(argv[:2])
    parser = argparse.ArgumentParser(prog="inference-cache", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if chosen[:1] == [name]:
            _load(module).add_arguments(p)
        p.set_defaults(_module=module)
    bench = sub.add_parser("bench", help="benchmarks (JSON with --json OUT)")
    bsub = bench.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for name, (module, help_) in BENCHES.items():
        p = bsub.add_parser(name, help=help_, description=help_)
        if chosen == ["bench", name]:
            _load(module).add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    rc: int = _load(args._module).run(args)
    return rc


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
