"""inference-perf (the Inference Extension's load generator) as ``bench live``'s client for the
shared-prefix workload.

Owner: the benchmarks (issue #6); used by :mod:`inference_cache.livebench` when
``--load-generator`` resolves to ``inference-perf`` (``auto``: when it is installed, for
``shared_prefix``). It needs Python >= 3.12, so it lives in a venv of its own, installed by
``hack/peers.py`` (``make peers``, part of ``make bench``)::

    Load --> config() --> <workdir>/inference-perf-N.yaml
         --> .tools/inference-perf/bin/inference-perf -c FILE (a subprocess; its own data
             generator `shared_prefix`, `concurrent` load, streamed /v1/completions)
         --> <report dir>/per_request_lifecycle_metrics.json --> parse_requests --> [Record]

Each :class:`Record` carries what ``bench live`` summarises for its own client: the request body
(for the ideal hit), the engine's ``usage`` (prompt and cached tokens: the hit stays the
engines' ``cached_tokens``), and inference-perf's own time to first token and latency.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
EXECUTABLE = REPO / ".tools" / "inference-perf" / "bin" / "inference-perf"
VERSION = "0.7.0"
"""The version ``hack/peers.py`` pins."""
PATH = "/v1/completions"
"""Where its ``shared_prefix`` generator sends (text prompts, never chat)."""
PER_REQUEST = "per_request_lifecycle_metrics.json"
RUN_TIMEOUT_S = 600.0
DESCRIPTION = f"inference-perf {VERSION} (shared_prefix data generator, concurrent load)"
CLIENT_MODE = "streamed completions, stream_options.include_usage, inference-perf's aiohttp pool (keep-alive)"


class InferencePerfError(Exception):
    """inference-perf failed or wrote no report we can read."""


@dataclass(frozen=True, slots=True)
class Load:
    """One run: where to send, the workload's shape in tokens, and the load."""

    url: str
    model: str
    tokenizer: Path
    """A local Hugging Face tokenizer folder (inference-perf sizes its prompts with it)."""
    groups: int
    questions: int
    prefix_tokens: int
    question_tokens: int
    max_tokens: int
    concurrency: int
    seed: int
    report_dir: Path


@dataclass(frozen=True, slots=True)
class Record:
    start: float
    body: bytes
    prompt_tokens: int
    cached_tokens: int
    ttft_s: float
    latency_s: float
    error: str | None


def installed(executable: Path = EXECUTABLE) -> bool:
    return executable.is_file()


def config(load: Load) -> dict[str, Any]:
    """The inference-perf config file of ``load`` (its pydantic ``Config`` schema)."""
    return {
        "api": {"type": "completion", "streaming": True},
        "data": {
            "type": "shared_prefix",
            "shared_prefix": {
                "num_groups": load.groups,
                "num_prompts_per_group": load.questions,
                "system_prompt_len": load.prefix_tokens,
                "question_len": load.question_tokens,
                "output_len": load.max_tokens,
                "seed": load.seed,
            },
        },
        "load": {
            "type": "concurrent",
            "stages": [{"num_requests": load.groups * load.questions, "concurrency_level": load.concurrency}],
            "num_workers": 1,
        },
        "server": {"type": "vllm", "model_name": load.model, "base_url": load.url, "ignore_eos": True},
        "tokenizer": {"pretrained_model_name_or_path": str(load.tokenizer)},
        "report": {
            "request_lifecycle": {
                "summary": True,
                "per_stage": False,
                "per_request": True,
                "per_request_fields": {"response": False, "response_chunks": False, "computed_metrics": True},
            },
            "prometheus": None,
        },
        "storage": {"local_storage": {"path": str(load.report_dir)}},
    }


def _record(entry: Mapping[str, Any]) -> Record:
    info = entry.get("info") or {}
    usage = (info.get("response_metrics") or {}).get("server_usage") or {}
    computed = entry.get("computed_metrics") or {}
    error = entry.get("error")
    start, end = float(entry["start_time"]), float(entry["end_time"])
    ttft = computed.get("time_to_first_token")
    return Record(
        start=start,
        body=str(entry["request"]).encode(),
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        cached_tokens=int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0),
        ttft_s=float(ttft) if ttft is not None else float("nan"),
        latency_s=float(computed.get("request_latency", end - start)),
        error=None if error is None else f"{error.get('error_type')}: {error.get('error_msg')}",
    )


def parse_requests(data: object) -> list[Record]:
    """The per-request report (a JSON array) as records in send order."""
    if not isinstance(data, list) or not all(isinstance(e, dict) for e in data):
        raise InferencePerfError("the per-request report is not a JSON array of objects")
    try:
        records = [_record(e) for e in data]
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise InferencePerfError(f"unexpected per-request entry: {exc!r}") from exc
    return sorted(records, key=lambda r: r.start)


def read_report(report_dir: Path) -> list[Record]:
    try:
        return parse_requests(json.loads((report_dir / PER_REQUEST).read_text(encoding="utf-8")))
    except (OSError, ValueError) as exc:
        raise InferencePerfError(f"{report_dir / PER_REQUEST}: {exc}") from exc


def _tail(log: Path, lines: int = 20) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    return ""


async def run(load: Load, config_file: Path, log: Path, executable: Path = EXECUTABLE) -> list[Record]:
    """Write the config, run inference-perf to completion, -> its per-request records."""
    await asyncio.to_thread(config_file.write_text, yaml.safe_dump(config(load), sort_keys=False))
    with log.open("ab") as out:
        proc = await asyncio.create_subprocess_exec(
            str(executable),
            "--config_file",
            str(config_file),
            "--log-level",
            "WARNING",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    rc: int | None = None
    try:
        rc = await asyncio.wait_for(proc.wait(), RUN_TIMEOUT_S)
    except TimeoutError:
        pass
    finally:
        if proc.returncode is None:  # timed out or cancelled: its worker processes too
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
    if rc is None:
        raise InferencePerfError(f"inference-perf did not finish in {RUN_TIMEOUT_S:g} s:\n{_tail(log)}")
    if rc != 0:
        raise InferencePerfError(f"inference-perf exited {rc}:\n{_tail(log)}")
    return await asyncio.to_thread(read_report, load.report_dir)


def shape_in_tokens(words: int, tokens_per_word: float) -> int:
    """A size given in words of the demo vocabulary, in tokens (inference-perf sizes in tokens)."""
    return max(1, round(words * tokens_per_word))
