"""Walks the ``inference-cache`` parser tree the way ``cli.main`` builds it (shared by the
CLI tests: ``test_docs_reference``, ``test_cli_help``)."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

from inference_cache import cli


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """``parser``'s subcommands by name (empty for a leaf)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def commands() -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """``(command path, its parser)`` for every leaf of the ``inference-cache`` tree, each
    built the way ``cli.main`` builds it (only the chosen owner is loaded)."""
    for name in cli.SUBCOMMANDS:
        yield name, subparsers(cli.build_parser([name]))[name]
    for name in cli.BENCHES:
        bench = subparsers(cli.build_parser(["bench", name]))["bench"]
        yield f"bench {name}", subparsers(bench)[name]
