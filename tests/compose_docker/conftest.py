"""``tests/compose_docker/`` needs Docker: `make test` never collects it (no skip markers, the
files are simply not collected), `make compose-test` sets ``INFERENCE_CACHE_COMPOSE_TEST=1``
and runs it (``pip install -e '.[compose]'`` for testcontainers)."""

from __future__ import annotations

import os

collect_ignore = [] if os.environ.get("INFERENCE_CACHE_COMPOSE_TEST") == "1" else ["test_compose.py"]
