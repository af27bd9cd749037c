"""Every option of every ``inference-cache`` command says what it does in ``--help``."""

from __future__ import annotations

import argparse

import cli_walk


def _undocumented(parser: argparse.ArgumentParser) -> list[str]:
    """``parser``'s options whose help text is missing or blank."""
    return [
        "/".join(action.option_strings)
        for action in parser._actions
        if action.option_strings and not (action.help or "").strip()
    ]


def test_every_option_has_a_help_text() -> None:
    missing = []
    commands = list(cli_walk.commands())
    for command, parser in commands:
        assert len(parser._actions) > 1, f"{command}: no options found (is the parser walk broken?)"
        missing += [f"{command} {option}" for option in _undocumented(parser)]
    assert not missing, "options without a help text:\n  " + "\n  ".join(missing)


def test_an_option_without_help_is_reported() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--described", help="does a thing")
    parser.add_argument("--bare")
    parser.add_argument("--blank", help="  ")
    assert _undocumented(parser) == ["--bare", "--blank"]
