"""Template warm-up: pre-fill each PromptTemplate's stable prefix on the replicas the picker
would choose for it, so the first real request of a template already hits.

Owner: ``inference_cache.extproc`` (built and started by ``serve`` when ``warmup.enabled``;
``config.WarmupSettings``). Place in the flow::

    serve config templates: / PUT /templates --> TemplateStore.replace
        --> Warmer.changed (returns at once) --> one background task per (template, model)
            whose revision is new, for every model with a tokenizer whose tenant may use it:
              known_prefix (worker thread: render.stable_prefix, every slot unknown)
              --> picker.rank(the prefix's block keys) --> the top ``replicas``
              --> POST http://<replica>/v1/completions {prompt: stable text, max_tokens: 1}
                  (``add_special_tokens: false`` for a chat template: the text is the chat
                  template's rendering), at most ``max_concurrency`` at once, each bounded
                  by ``timeout_s``; the picker's in-flight and speculative views see it
                  like a routed request, and the engine's KV events confirm it

Nothing here is on the request path or in ``PUT /templates``: failures are logged and
counted (``inferencecache_template_warmups_total{result}``), and a failed (template, model)
is tried again on the next change of the template set.

What the warm-up can know is the template, not a request's values: the prefix it pre-fills
is the rendering up to the first slot of any kind (:func:`known_prefix`). For a template
whose stable part is literal text (a long system prompt, then Mutable slots) that is the
whole stable prefix; a template whose stable part starts with a Stable slot only gets the
text before that slot.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any, Final

import aiohttp
from prometheus_client import CollectorRegistry, Counter

from inference_cache import config as config_mod
from inference_cache import render
from inference_cache.extproc import picker as picker_mod
from inference_cache.extproc import templates as templates_mod
from inference_cache.index import types

log = logging.getLogger(__name__)

#: The ``result`` label values of ``inferencecache_template_warmups_total``.
RESULT_OK: Final = "ok"  # the replica prefilled the prefix
RESULT_CACHED: Final = "cached"  # the index says the replica already holds it: not sent
RESULT_SHORT: Final = "short"  # under one full block: nothing the engine would cache
RESULT_FAILED: Final = "failed"  # no tokens, no ready replica, HTTP error or timeout


class WarmupError(Exception):
    """A warm-up request the engine did not answer with 200."""


def known_prefix(
    spec: render.TemplateSpec, tokenizer: render.ChatTokenizer, block_size: int
) -> render.StablePrefix:
    """The stable prefix known without a request's values: ``spec`` with every slot
    treated as Mutable, so the rendering up to the first slot (for a template whose stable
    part has no slot, its whole stable prefix). CPU-bound (tokenizer probing)."""
    raw = spec.to_dict()
    raw["slots"] = [{**slot, "type": render.SlotType.MUTABLE.value} for slot in raw["slots"]]
    return render.stable_prefix(render.TemplateSpec.from_dict(raw), tokenizer, block_size)


def warmup_body(model: str, prefix: render.StablePrefix, *, chat: bool) -> dict[str, Any]:
    """The engine request that pre-fills ``prefix``: a raw completion of one token."""
    body: dict[str, Any] = {"model": model, "prompt": prefix.text, "max_tokens": 1}
    if chat:
        body["add_special_tokens"] = False  # the chat template's rendering has them already
    return body


class Warmer:
    """Pre-fills new template revisions in the background; ``start`` / ``stop`` on the loop."""

    def __init__(
        self,
        picker: picker_mod.EndpointPicker,
        settings: config_mod.WarmupSettings,
        *,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.settings = settings
        self._picker = picker
        self._latest: tuple[templates_mod.StoredTemplate, ...] = ()
        #: (template ref, model) -> the revision warmed or being warmed.
        self._warmed: dict[tuple[str, str], str] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None
        self._slots = asyncio.Semaphore(settings.max_concurrency)
        self.results = Counter(
            "inferencecache_template_warmups",
            "Template warm-up requests by result (ok, cached, short, failed).",
            ["result"],
            registry=registry,
        )

    def changed(self, templates: Sequence[templates_mod.StoredTemplate]) -> None:
        """The new template set (``TemplateStore.on_replace``): warm what is new."""
        self._latest = tuple(templates)
        if self._session is not None:
            self._schedule()

    def start(self) -> None:
        """Begin warming (the current set first); call on the running loop."""
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.settings.timeout_s))
        self._schedule()

    async def stop(self) -> None:
        tasks = tuple(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def settled(self) -> None:
        """Until every warm-up scheduled so far has finished (the demo, tests)."""
        while self._tasks:
            await asyncio.gather(*tuple(self._tasks), return_exceptions=True)

    def _schedule(self) -> None:
        live = {(t.ref, m) for t in self._latest for m in self._picker.routes}
        for gone in [k for k in self._warmed if k not in live]:
            del self._warmed[gone]  # removed: warm it again if it comes back
        for template in self._latest:
            for model, route in self._picker.routes.items():
                if route.tokenizer is None or not self._usable(template, route):
                    continue
                key = (template.ref, model)
                if self._warmed.get(key) == template.revision:
                    continue
                self._warmed[key] = template.revision
                task = asyncio.create_task(self._warm(template, route), name=f"warmup:{template.ref}:{model}")
                self._tasks.add(task)
                task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        """Drop the finished task; a bug (an exception nothing expected) is logged and
        counted as a failure rather than lost."""
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            self.results.labels(RESULT_FAILED).inc()
            log.error("template_warmup_crashed", extra={"task": task.get_name(), "error": repr(exc)})

    def _usable(self, template: templates_mod.StoredTemplate, route: picker_mod.Route) -> bool:
        """Whether requests for ``route`` can name ``template`` (any tenant when the tenant
        header is trusted, else the model's)."""
        return self._picker.settings.tenant_header or template.usable_from(route.tenant)

    async def _warm(self, template: templates_mod.StoredTemplate, route: picker_mod.Route) -> None:
        model, bs = route.model.name, route.model.block_size
        assert route.tokenizer is not None
        try:
            prefix = await asyncio.to_thread(known_prefix, template.spec, route.tokenizer.tokenizer, bs)
        except Exception as exc:  # TemplateError, or tokenizers' plain Exception
            self._failed(template, model, "", exc)
            return
        if not prefix.block_keys:
            self.results.labels(RESULT_SHORT).inc()
            return
        candidates = self._picker.ready_endpoints(route)
        if not candidates:
            self._failed(template, model, "", WarmupError("no ready replica"))
            return
        prompt = self._picker.precise_prompt(route, prefix.token_ids)
        ranked = self._picker.rank(route, "", prompt, candidates)
        full = len(prefix.block_keys) * bs
        targets = [s.replica_id for s in ranked.order[: self.settings.replicas]]
        await asyncio.gather(
            *(
                self._prefill(template, route, prefix, rid, held=ranked.matched.get(rid, 0) >= full)
                for rid in targets
            )
        )

    async def _prefill(
        self,
        template: templates_mod.StoredTemplate,
        route: picker_mod.Route,
        prefix: render.StablePrefix,
        replica_id: str,
        *,
        held: bool,
    ) -> None:
        if held:
            self.results.labels(RESULT_CACHED).inc()
            return
        model, bs = route.model.name, route.model.block_size
        assert self._session is not None
        body = warmup_body(model, prefix, chat=template.spec.is_chat)
        async with self._slots:
            if route.precise:
                scope = types.Scope(route.tenant, model, types.HASH_SCHEME_VLLM, "")
                self._picker.speculative.record(scope, replica_id, prefix.block_keys, bs)
            ticket = self._picker.inflight.begin(replica_id, prefix.token_count)
            try:
                async with self._session.post(f"http://{replica_id}/v1/completions", json=body) as response:
                    if response.status != 200:
                        raise WarmupError(f"HTTP {response.status}: {(await response.text())[:200]}")
                    await response.read()
            except (aiohttp.ClientError, TimeoutError, WarmupError) as exc:
                self._failed(template, model, replica_id, exc)
                return
            finally:
                self._picker.inflight.end(ticket, linger=False)
        self.results.labels(RESULT_OK).inc()
        log.info(
            "template_warmed",
            extra={
                "template": template.ref,
                "revision": template.revision,
                "model": model,
                "replica": replica_id,
                "stable_tokens": prefix.token_count,
            },
        )

    def _failed(
        self, template: templates_mod.StoredTemplate, model: str, replica: str, exc: Exception
    ) -> None:
        self.results.labels(RESULT_FAILED).inc()
        if self._warmed.get((template.ref, model)) == template.revision:
            del self._warmed[(template.ref, model)]  # try again on the next change
        log.warning(
            "template_warmup_failed",
            extra={
                "template": template.ref,
                "revision": template.revision,
                "model": model,
                "replica": replica,
                "error": str(exc) or type(exc).__name__,
            },
        )
