"""The kopf operator: CRDs, cache backends, engine wiring, gateway objects (issue #7).

Owner: ``inference-cache operator``. Reconcile logic lives in pure ``desired_*``
functions; kopf handlers stay thin. This folder is a namespace package on purpose (see
``README.md`` beside this file): a regular top-level ``operator`` package would shadow
the standard library for anything started from the repository root. Nothing is
implemented yet; no placeholder API is exported.
"""
