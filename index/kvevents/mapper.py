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
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from inference_cache.index import fingerprint
from inference_cache.index.kvevents import decode
from inference_cache.index.kvevents.config import EndpointConfig
from inference_cache.index.kvevents.counters import CLEARED, REMOVED, STORED, UNKNOWN, Counters
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


# A model block's node (the common case: every vLLM block) is one int, so a rank's
# ``nodes`` dict holds only ints and stays outside the cyclic GC: it is never traversed
# by a collection, however many blocks the engine holds (a ``_Node`` object per block
# made a full collection cost ~85 ms at 200k blocks, paid inline by whatever request the
# event loop was serving; docs/benchmarks.md "GC pauses"). Bits: the block's prefix hash
# (64), the cumulative tokens (39), whether the node holds a reference to its key (1), the
# scope id (the rest).
_PREFIX_MASK = (1 << 64) - 1
_TOKENS_SHIFT = 64
_TOKENS_MASK = (1 << 39) - 1
_REF = 1 << 103
_SCOPE_SHIFT = 104


def _pack(prefix: int, tokens: int, scope_id: int) -> int:
    """A completed block's node, holding one reference to its key."""
    return prefix | tokens << _TOKENS_SHIFT | _REF | scope_id << _SCOPE_SHIFT


def _tokens(node: int) -> int:
    return (node >> _TOKENS_SHIFT) & _TOKENS_MASK


@dataclass(slots=True)
class _Node:
    """A chain position that is not one packed int: a fresh chain's root, or an SGLang
    page that leaves a partial model block pending (GC-tracked, SGLang only)."""

    #: Our prefix hash through the last complete model block (``None``: fresh, unsalted).
    prefix: int | None
    #: Cumulative tokens through that block.
    tokens: int
    #: Tokens after that block through this page (SGLang's pending partial block).
    pending: tuple[int, ...] = ()
    #: Engine hashes of the pages in that partial block, this one included.
    pending_pages: tuple[int, ...] = ()
    #: Engine hashes of the pages that completed a model block this page is part of.
    completed_by: list[int] = field(default_factory=list)

    @classmethod
    def of(cls, node: int) -> _Node:
        return cls(node & _PREFIX_MASK, _tokens(node))


@dataclass(slots=True)
class _Rank:
    #: engine hash -> packed node (``_pack``) of a page that completed a model block.
    nodes: dict[int, int] = field(default_factory=dict)
    #: engine hash -> node of a page that leaves a partial model block (SGLang).
    partial: dict[int, _Node] = field(default_factory=dict)
    #: ``group_idx`` values whose stores we indexed (removals of other groups are skipped).
    groups: set[int | None] = field(default_factory=set)

    def get(self, engine_hash: int) -> _Node | None:
        node = self.nodes.get(engine_hash)
        return _Node.of(node) if node is not None else self.partial.get(engine_hash)


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
        #: scope id -> our key -> the nodes (over all ranks) holding a reference to it
        #: (bytes -> int dicts: outside the cyclic GC, as ``_Rank.nodes``).
        self._refs: dict[int, dict[bytes, int]] = {}
        self._scopes: list[Scope] = []
        self._scope_ids: dict[Scope, int] = {}

    def apply(self, batch: decode.EventBatch, *, rank: int = 0) -> None:
        """Apply one decoded batch published by ``rank``."""
        for event in batch.events:
            match event:
                case decode.BlockStored():
                    self.counters.events[STORED] += 1
                    self._stored(event, rank, batch.ts)
                case decode.BlockRemoved():
                    self.counters.events[REMOVED] += 1
                    self._removed(event, rank)
                case decode.AllBlocksCleared():
                    self.counters.events[CLEARED] += 1
                    self.drop_rank(rank)
                case decode.UnknownEvent():
                    self.counters.events[UNKNOWN] += 1

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
            parent = state.get(ev.parent_block_hash)
            if parent is None:
                self.counters.orphan_blocks += n
                return
            cur = parent
        state.groups.add(ev.group_idx)
        scope = Scope(self._config.tenant, self._config.model, HASH_SCHEME_VLLM, adapter)
        scope_id = self._scope_id(scope)
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
        bs = self._config.block_size
        prefix, tokens, pending, pages = cur.prefix, cur.tokens, cur.pending, cur.pending_pages
        for i, engine_hash in enumerate(ev.block_hashes):
            why = _block_extra_reason(ev.extra_keys, i)
            if why is not None:
                self.counters.skipped_blocks[why] += n - i
                break
            page_tokens = ev.token_ids[i * page : (i + 1) * page]
            if whole is not None and i < len(whole):
                completed = whole[i]
            else:
                step = _advance(prefix, tokens, pending, pages, page_tokens, engine_hash, bs, state)
                if step is None:
                    self.counters.skipped_blocks["token_ids"] += n - i
                    break
                if isinstance(step, _Node):
                    old = state.nodes.pop(engine_hash, None)
                    if old is not None:
                        self._drop_ref(old, gone)
                    state.partial[engine_hash] = step
                    pending, pages = step.pending, step.pending_pages
                    continue
                completed = step
            key = fingerprint.key_bytes(completed)
            refs = self._refs.setdefault(scope_id, {})
            refs[key] = refs.get(key, 0) + 1
            if not keys:
                first_parent = prefix
            if self._bytes is not None:
                block_tokens.extend(pending)
                block_tokens.extend(page_tokens)
            prefix, tokens, pending, pages = completed, tokens + bs, (), ()
            old = state.nodes.get(engine_hash)
            state.nodes[engine_hash] = _pack(completed, tokens, scope_id)
            if old is not None:
                self._drop_ref(old, gone)
            elif state.partial:
                state.partial.pop(engine_hash, None)
            keys.append(key)
            counts.append(tokens)
        self._emit_removed(gone)
        if keys:
            # bytes first: an entry the index evicts on this very write leaves both
            if self._bytes is not None:
                self._bytes.blocks_stored(scope, self._config.replica_id, first_parent, keys, block_tokens)
            self._sink.blocks_stored(scope, self._config.replica_id, keys, counts, ts)

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
            if node is not None:
                self._drop_ref(node, gone)
                continue
            partial = state.partial.pop(engine_hash, None)
            if partial is None:
                self.counters.unknown_removals += 1
                continue
            # Removing any page of a model block removes the block (SGLang).
            for completer in partial.completed_by:
                other = state.nodes.get(completer)
                if other is not None and other & _REF:
                    self._drop_ref(other, gone)
                    state.nodes[completer] = other & ~_REF
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

    def _scope_id(self, scope: Scope) -> int:
        sid = self._scope_ids.get(scope)
        if sid is None:
            sid = self._scope_ids[scope] = len(self._scopes)
            self._scopes.append(scope)
        return sid

    def _drop_ref(self, node: int, gone: dict[Scope, list[bytes]]) -> None:
        """Release the reference ``node`` holds (if it still does): its key is gone from
        this replica when no node of any rank holds it."""
        if not node & _REF:
            return
        sid = node >> _SCOPE_SHIFT
        refs = self._refs[sid]
        key = fingerprint.key_bytes(node & _PREFIX_MASK)
        left = refs[key] - 1
        if left > 0:
            refs[key] = left
            return
        del refs[key]
        if not refs:
            del self._refs[sid]
        gone[self._scopes[sid]].append(key)

    def _emit_removed(self, gone: dict[Scope, list[bytes]]) -> None:
        for scope, keys in gone.items():
            self._sink.blocks_removed(scope, self._config.replica_id, keys)
            if self._bytes is not None:
                self._bytes.blocks_removed(scope, self._config.replica_id, keys)


def _advance(
    prefix: int | None,
    tokens: int,
    pending: tuple[int, ...],
    pages: tuple[int, ...],
    page_tokens: Sequence[int],
    engine_hash: int,
    block_size: int,
    state: _Rank,
) -> int | _Node | None:
    """One page chained after a node with ``prefix`` (``tokens`` through it) and ``pending``
    tokens in pages ``pages`` (SGLang): the completed block's prefix hash, or the page's
    partial node, or ``None`` for a bad token id."""
    pending = pending + tuple(page_tokens)
    pages = (*pages, engine_hash)
    if len(pending) < block_size:
        return _Node(prefix, tokens, pending, pages)
    try:
        (completed,) = fingerprint.prefix_hashes(pending, block_size, parent=prefix)
    except ValueError:
        return None
    for member in pages[:-1]:
        member_node = state.partial.get(member)
        if member_node is not None:
            member_node.completed_by.append(engine_hash)
    return completed


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
