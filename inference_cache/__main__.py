"""``python -m inference_cache`` = the ``inference-cache`` console script."""

from inference_cache.cli import main

raise SystemExit(main())
