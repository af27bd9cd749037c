"""Engine block hashes -> our fingerprint keys, per (replica, rank).

Owner: ``inference_cache.index.kvevents``. Sits between ``decode`` (typed events from
one replica) and a ``BlockSink`` (the ``Index`` in the server, a gRPC forwarder in the
``subscribe`` sidecar). Pure state machine: no I/O, no clock.

Engine hashes are opaque and seeded per process, so every stored block is re-keyed with
OUR content fingerprint (``index.fingerprint``) computed from its token ids, chained from
its parent's key. Per rank we remember ``engine hash -> node`` (our prefix hash and
cumulative tokens), which is also the only way to translate a later ``BlockRemoved``.

Rules (research ``protocols.md`` §1.5, §2.4, §3):
- parent ``None``: a fresh chain, salted (``fingerprint.salt_root``) when block 0 carries
  a cache salt; parent known: chain from it; parent unknown: orphan, never re-rooted;
- indexed only: medium GPU (any case) or absent; ``kv_cache_spec_kind`` full/MLA
  attention, or absent with ``group_idx`` 0/absent; ``block_size`` equal to the model's
  (SGLang: pages that divide it); ``len(token_ids) == blocks x block_size``; no multimodal
  or prompt-embeds extra keys; a ``lora_id`` must map to a configured adapter name;
- SGLang stores one page per event: pages accumulate into a pending partial block along
  each chain and a model-block key is emitted when it fills; removing any page removes
  the model block(s) it is part of;
- ranks of one replica (vLLM internal DP load balancing) keep separate maps, but our keys
  are refcounted per replica: the sink hears a removal only when no rank holds the key.

An optional ``bytes_sink`` (``index.bytekeys.ByteIndex``, models matched by bytes, issue #9)
hears the same stores (with the completed blocks' token ids and the parent before the
first one), removals and clears, with the very key objects the sink gets.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from inference_cache.index import fingerprint
from inference_cache.index.kvevents import decode
from inference_cache.index.kvevents.config import EndpointConfig
from inference_cache.index.kvevents.counters import Counters
from inference_cache.index.types import HASH_SCHEME_VLLM, Scope

if TYPE_CHECKING:  # the ``subscribe`` sidecar never loads ``tokenizers``
    from inference_cache.index import bytekeys

log = logging.getLogger(__name__)

_INDEXED_KINDS = frozenset({"full_attention", "mla_attention"})


class BlockSink(Protocol):
    """Where mapped blocks go (``inference_cache.index.store.Index`` implements it)."""

    def blocks_stored(
        self,
        scope: Scope,
        replica_id: str,
        keys: Sequence[bytes],
        token_counts: Sequence[int],
        ts: float | None = None,
    ) -> None: ...

    def blocks_removed(self, scope: Scope, replica_id: str, keys: Sequence[bytes]) -> None: ...

    def replica_cleared(self, replica_id: str, *, model: str, tenant: str) -> None: ...


_Ref = tuple[Scope, bytes]


@dataclass(slots=True)
class _Node:
    """What we know about one engine hash (a vLLM block or an SGLang page)."""

    #: Our prefix hash through the last complete model block (``None``: fresh, unsalted).
    prefix: int | None
    #: Cumulative tokens through that block.
    tokens: int
    #: Tokens after that block through this page (SGLang's pending partial block).
    pending: tuple[int, ...] = ()
    #: Engine hashes of the pages in that partial block, this one included.
    pending_pages: tuple[int, ...] = ()
    #: The key this node completed (it holds one reference to it).
    ref: _Ref | None = None
    #: Nodes that completed a model block this page is part of (SGLang).
    completed_by: list[int] = field(default_factory=list)


@dataclass(slots=True)
class _Rank:
    nodes: dict[int, _Node] = field(default_factory=dict)
    #: ``group_idx`` values whose stores we indexed (removals of other groups are skipped).
    groups: set[int | None] = field(default_factory=set)


class Mapper:
    """Maps one replica's events (all its ranks) onto a ``BlockSink``."""

    def __init__(
        self,
        config: EndpointConfig,
        sink: BlockSink,
        counters: Counters | None = None,
        *,
        bytes_sink: bytekeys.ByteIndex | None = None,
    ) -> None:
        self._config = config
        self._sink = sink
        self._bytes = bytes_sink
        self.counters = counters if counters is not None else Counters()
        self._ranks: dict[int, _Rank] = {}
        self._refs: Counter[_Ref] = Counter()

    def apply(self, batch: decode.EventBatch, *, rank: int = 0) -> None:
        """Apply one decoded batch published by ``rank``."""
        for event in batch.events:
            match event:
                case decode.BlockStored():
                    self.counters.events["BlockStored"] += 1
                    self._stored(event, rank, batch.ts)
                case decode.BlockRemoved():
                    self.counters.events["BlockRemoved"] += 1
                    self._removed(event, rank)
                case decode.AllBlocksCleared():
                    self.counters.events["AllBlocksCleared"] += 1
                    self.drop_rank(rank)
                case decode.UnknownEvent():
                    self.counters.events["unknown"] += 1

    def drop_rank(self, rank: int) -> None:
        """Forget everything ``rank`` told us (engine cleared, restarted, or events lost).

        The sink hears ``replica_cleared`` when no rank of the replica holds anything any
        more, else ``blocks_removed`` for the keys only this rank held.
        """
        state = self._ranks.pop(rank, None)
        gone: dict[Scope, list[bytes]] = defaultdict(list)
        if state is not None:
            for node in state.nodes.values():
                self._drop_ref(node, gone)
        if not self._refs:
            c = self._config
            self._sink.replica_cleared(c.replica_id, model=c.model, tenant=c.tenant)
            if self._bytes is not None:
                self._bytes.replica_cleared(c.replica_id, model=c.model, tenant=c.tenant)
        else:
            self._emit_removed(gone)

    # -- events -----------------------------------------------------------------------------

    def _stored(self, ev: decode.BlockStored, rank: int, ts: float) -> None:
        n = len(ev.block_hashes)
        reason = self._filter(ev)
        if reason is not None:
            self.counters.skipped_blocks[reason] += n
            return
        adapter = self._adapter(ev)
        if adapter is None:
            self.counters.skipped_blocks["lora_id_unmapped"] += n
            return
        state = self._ranks.setdefault(rank, _Rank())
        if ev.parent_block_hash is None:
            salt, why = _salt(ev, adapter)
            if why is not None:
                self.counters.skipped_blocks[why] += n
                return
            cur = _Node(prefix=fingerprint.salt_root(salt) if salt else None, tokens=0)
        else:
            parent = state.nodes.get(ev.parent_block_hash)
            if parent is None:
                self.counters.orphan_blocks += n
                return
            cur = parent
        state.groups.add(ev.group_idx)
        scope = Scope(self._config.tenant, self._config.model, HASH_SCHEME_VLLM, adapter)
        page = ev.block_size
        keys: list[bytes] = []
        counts: list[int] = []
        # For ``bytes_sink``: the prefix before the first completed block, and the
        # completed blocks' token ids.
        first_parent: int | None = None
        block_tokens: list[int] = []
        gone: dict[Scope, list[bytes]] = defaultdict(list)
        # vLLM (a page is a block, nothing pending): every block's prefix hash in one pass
        # over the event's tokens (one u32 conversion, not one per block).
        whole: list[int] | None = None
        if page == self._config.block_size and not cur.pending:
            try:
                whole = fingerprint.prefix_hashes(ev.token_ids, page, parent=cur.prefix)
            except ValueError:
                whole = None  # a bad token id: the per-block path finds which block
        for i, engine_hash in enumerate(ev.block_hashes):
            why = _block_extra_reason(ev.extra_keys, i)
            if why is not None:
                self.counters.skipped_blocks[why] += n - i
                break
            page_tokens = ev.token_ids[i * page : (i + 1) * page]
            node: _Node | None
            if whole is not None and i < len(whole):
                node = self._complete(cur, whole[i], scope)
            else:
                node = self._advance(cur, page_tokens, engine_hash, scope, state)
            if node is None:
                self.counters.skipped_blocks["token_ids"] += n - i
                break
            old = state.nodes.get(engine_hash)
            state.nodes[engine_hash] = node
            if old is not None:
                self._drop_ref(old, gone)
            if node.ref is not None:
                if not keys:
                    first_parent = cur.prefix
                keys.append(node.ref[1])
                counts.append(node.tokens)
                if self._bytes is not None:
                    block_tokens.extend(cur.pending)
                    block_tokens.extend(page_tokens)
            cur = node
        self._emit_removed(gone)
        if keys:
            # bytes first: an entry the index evicts on this very write leaves both
            if self._bytes is not None:
                self._bytes.blocks_stored(scope, self._config.replica_id, first_parent, keys, block_tokens)
            self._sink.blocks_stored(scope, self._config.replica_id, keys, counts, ts)

    def _advance(
        self, parent: _Node, page_tokens: Sequence[int], engine_hash: int, scope: Scope, state: _Rank
    ) -> _Node | None:
        """The node of one page chained after ``parent`` (completing a block if it fills)."""
        pending = parent.pending + tuple(page_tokens)
        pages = (*parent.pending_pages, engine_hash)
        bs = self._config.block_size
        if len(pending) < bs:
            return _Node(parent.prefix, parent.tokens, pending, pages)
        try:
            (prefix,) = fingerprint.prefix_hashes(pending, bs, parent=parent.prefix)
        except ValueError:
            return None
        for member in pages[:-1]:
            member_node = state.nodes.get(member)
            if member_node is not None:
                member_node.completed_by.append(engine_hash)
        return self._complete(parent, prefix, scope)

    def _complete(self, parent: _Node, prefix: int, scope: Scope) -> _Node:
        """The node of a model block completed after ``parent`` with prefix hash ``prefix``
        (it holds one reference to its key)."""
        ref = (scope, fingerprint.key_bytes(prefix))
        self._refs[ref] += 1
        return _Node(prefix, parent.tokens + self._config.block_size, ref=ref)

    def _removed(self, ev: decode.BlockRemoved, rank: int) -> None:
        n = len(ev.block_hashes)
        if not _gpu(ev.medium):
            self.counters.skipped_blocks["medium"] += n
            return
        state = self._ranks.get(rank)
        if state is None:
            self.counters.unknown_removals += n
            return
        if ev.group_idx is not None and ev.group_idx not in state.groups:
            self.counters.skipped_blocks["group_idx"] += n
            return
        gone: dict[Scope, list[bytes]] = defaultdict(list)
        for engine_hash in ev.block_hashes:
            node = state.nodes.pop(engine_hash, None)
            if node is None:
                self.counters.unknown_removals += 1
                continue
            self._drop_ref(node, gone)
            for completer in node.completed_by:
                other = state.nodes.get(completer)
                if other is not None:
                    self._drop_ref(other, gone)
        self._emit_removed(gone)

    # -- helpers ------------------------------------------------------------------------------

    def _filter(self, ev: decode.BlockStored) -> str | None:
        if not _gpu(ev.medium):
            return "medium"
        if ev.kv_cache_spec_kind is not None:
            if ev.kv_cache_spec_kind not in _INDEXED_KINDS:
                return "kv_cache_spec_kind"
        elif ev.group_idx not in (None, 0):
            return "group_idx"
        bs = self._config.block_size
        if ev.block_size != bs and (self._config.engine != "sglang" or bs % ev.block_size):
            return "block_size"
        if len(ev.token_ids) != len(ev.block_hashes) * ev.block_size:
            return "token_count"
        return None

    def _adapter(self, ev: decode.BlockStored) -> str | None:
        if ev.lora_name:
            return ev.lora_name
        if ev.lora_id is None:
            return ""
        return self._config.lora_names.get(ev.lora_id)

    def _drop_ref(self, node: _Node, gone: dict[Scope, list[bytes]]) -> None:
        ref, node.ref = node.ref, None
        if ref is None:
            return
        self._refs[ref] -= 1
        if self._refs[ref] <= 0:
            del self._refs[ref]
            gone[ref[0]].append(ref[1])

    def _emit_removed(self, gone: dict[Scope, list[bytes]]) -> None:
        for scope, keys in gone.items():
            self._sink.blocks_removed(scope, self._config.replica_id, keys)
            if self._bytes is not None:
                self._bytes.blocks_removed(scope, self._config.replica_id, keys)


def _gpu(medium: str | None) -> bool:
    return medium is None or medium.upper() == "GPU"


def _block_extra_reason(extra: decode.ExtraKeys | None, i: int) -> str | None:
    """Why block ``i`` cannot be keyed by its tokens alone (``None``: it can)."""
    keys = extra[i] if extra is not None and i < len(extra) else None
    for k in keys or ():
        if isinstance(k, tuple):
            return "multimodal"
        if isinstance(k, bytes):
            return "prompt_embeds"
    return None


def _salt(ev: decode.BlockStored, adapter: str) -> tuple[str | None, str | None]:
    """``(cache salt of a fresh chain, skip reason)``.

    SGLang publishes ``cache_salt``; vLLM publishes the untagged extra keys of block 0:
    its string entries other than the LoRA name are the salt. More than one candidate is
    ambiguous (vLLM 0.12-0.17 multimodal identifiers are plain strings too): skipped.
    """
    if ev.cache_salt:
        return ev.cache_salt, None
    keys = ev.extra_keys[0] if ev.extra_keys else None
    candidates = [k for k in keys or () if isinstance(k, str) and k != adapter]
    if len(candidates) > 1:
        return None, "multimodal"
    return (candidates[0] if candidates else None), None
