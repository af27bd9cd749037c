"""Suite-wide safety nets (after kopf's): warnings are errors (pyproject), and no test
may leave asyncio tasks running."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest


@pytest.fixture(autouse=True)
async def _no_asyncio_pending_tasks() -> AsyncIterator[None]:
    before = asyncio.all_tasks()
    yield
    # Give cancelled tasks one loop turn to finish.
    await asyncio.sleep(0)
    leaked = {t for t in asyncio.all_tasks() - before if not t.done()}
    leaked.discard(asyncio.current_task())  # type: ignore[arg-type]
    if leaked:
        for t in leaked:
            t.cancel()
        pytest.fail(f"Unattended asyncio tasks detected: {leaked!r}")
