"""The byte-exact vLLM samples in ``shared/data/kv-events`` (beside the clone), read once
for every test that needs them: the per-version batches and the real 0.33 publisher
capture. Importable from any test as ``vllm_samples`` (``pythonpath = ["tests"]``)."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

KV_EVENTS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "kv-events"
CAPTURE = KV_EVENTS / "vllm0.33.0_real_publisher_capture.txt"


def kv_events_dir() -> Path:
    """The samples folder; a clear failure (never a skip) when it is missing."""
    if not KV_EVENTS.is_dir():
        raise FileNotFoundError(f"shared vLLM samples missing: {KV_EVENTS}")
    return KV_EVENTS


@dataclass(frozen=True, slots=True)
class CapturedFrame:
    """One payload of the capture, with the frames the publisher sent it in."""

    title: str
    topic: bytes
    #: The 8-byte sequence frame; ``None`` for the reconstructed (not captured) payload.
    seq: bytes | None
    payload: bytes

    @property
    def reconstructed(self) -> bool:
        return self.title.startswith("(RECONSTRUCTED")


def _hex(name: str, section: str) -> bytes | None:
    m = re.search(rf"^{name}_hex=([0-9a-f]+)", section, re.M)
    return bytes.fromhex(m.group(1)) if m else None


@functools.cache
def capture() -> tuple[CapturedFrame, ...]:
    """Every section of the capture that carries a payload, in file order."""
    out = []
    for section in kv_events_dir().joinpath(CAPTURE.name).read_text().split("\n## ")[1:]:
        payload = _hex("payload", section)
        if payload is not None:
            topic = _hex("topic", section) or b""
            out.append(CapturedFrame(section.splitlines()[0], topic, _hex("seq", section), payload))
    return tuple(out)


def captured(title_prefix: str) -> CapturedFrame:
    """The one captured (not reconstructed) frame whose section title starts so."""
    (frame,) = [f for f in capture() if f.title.startswith(title_prefix) and not f.reconstructed]
    return frame
