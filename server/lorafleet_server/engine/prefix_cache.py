"""The prefix cache: K/V of prompt blocks, reused by later requests of the same adapter version.

A prompt is cut into blocks of ``block_tokens`` tokens. Block ``i``'s id is a chain hash (SHA-256)
of the owner, every token of blocks ``0..i`` (through the previous block's id) and its own tokens,
so one id names one whole prefix. The owner (``Engine._cache_owner``) is the concrete adapter version
whose LoRA weights computed the K/V (``tenant/name@version``; versions are immutable, so a new version
never meets an old version's blocks) or the base model, for base requests and prompt adapters (their
template is part of the prompt's tokens): per tenant by default, so a prefix one tenant cached is no
faster for another (a cache hit is visible in the time to first token), or shared by all.

Blocks are stored one by one, not per prefix: prompts that share a system prompt but differ after
it share its blocks, and eviction can drop the tail of a prefix while its head stays. Least recently
used blocks leave first; a lookup or an insert refreshes a prefix's blocks last-to-first, so a
prefix's head is always fresher than its tail and eviction never strands a tail behind a missing head
for long (a stranded block is unreachable and goes next). An insert never evicts the prefix's own
blocks: where the cache cannot hold all of a prompt's blocks, it keeps the head (a prompt longer than
the cache evicted the head its lookup had just found, then its own new tail, at every repeat: an
outside review). Engine thread only, except the byte count.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

DEFAULT_BLOCK_TOKENS = 16


class PrefixCacheObserver(Protocol):
    """What the cache reports (metrics implement it)."""

    def prefix_lookup(self, lookup_tokens: int, hit_tokens: int) -> None: ...
    def prefix_evicted(self, blocks: int) -> None: ...


@dataclass(frozen=True)
class PrefixBlock:
    k: torch.Tensor  # [layers, kv_heads, block_tokens, head_dim]
    v: torch.Tensor  # [layers, kv_heads, block_tokens, head_dim]

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()


class PrefixCache:
    """Block K/V keyed by (owner, chain hash of the tokens), LRU within ``max_bytes`` (0: off)."""

    def __init__(
        self,
        max_bytes: int,
        block_tokens: int = DEFAULT_BLOCK_TOKENS,
        observer: PrefixCacheObserver | None = None,
    ) -> None:
        if max_bytes < 0:
            raise ValueError(f"prefix cache bytes must be >= 0, got {max_bytes}")
        if block_tokens <= 0:
            raise ValueError(f"block_tokens must be > 0, got {block_tokens}")
        self.max_bytes = max_bytes
        self.block_tokens = block_tokens
        self.observer = observer
        self._blocks: OrderedDict[bytes, PrefixBlock] = OrderedDict()  # least recently used first
        self.bytes_used = 0  # read from other threads (metrics); written by the engine thread

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def __len__(self) -> int:
        return len(self._blocks)

    def block_ids(self, owner: str, token_ids: Sequence[int], limit: int) -> list[bytes]:
        """Chain ids of the full blocks among the first ``limit`` tokens of ``token_ids``."""
        n = min(limit, len(token_ids)) // self.block_tokens
        parent = hashlib.sha256(b"lorafleet-prefix\0" + owner.encode()).digest()
        ids: list[bytes] = []
        for b in range(n):
            block = token_ids[b * self.block_tokens : (b + 1) * self.block_tokens]
            h = hashlib.sha256(parent)
            h.update(b"".join(int(t).to_bytes(4, "little", signed=False) for t in block))
            parent = h.digest()
            ids.append(parent)
        return ids

    def lookup(self, owner: str, token_ids: Sequence[int], limit: int) -> tuple[int, list[PrefixBlock]]:
        """The longest cached block-aligned prefix of ``token_ids[:limit]``: (its tokens, its blocks in
        order). Refreshes those blocks; reports nothing (``record`` does, once the caller knows what it
        reused)."""
        if not self.enabled:
            return 0, []
        found: list[tuple[bytes, PrefixBlock]] = []
        for bid in self.block_ids(owner, token_ids, limit):
            block = self._blocks.get(bid)
            if block is None:
                break
            found.append((bid, block))
        for bid, _ in reversed(found):  # the head ends up most recent: tails are evicted first
            self._blocks.move_to_end(bid)
        return len(found) * self.block_tokens, [b for _, b in found]

    def record(self, lookup_tokens: int, hit_tokens: int) -> None:
        """Report one prompt's lookup: ``lookup_tokens`` asked, ``hit_tokens`` of them reused (0 where
        the blocks found could not be copied in, so every token was computed)."""
        if self.enabled and self.observer is not None:
            self.observer.prefix_lookup(max(lookup_tokens, 0), hit_tokens)

    def insert(
        self,
        owner: str,
        token_ids: Sequence[int],
        limit: int,
        read: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]],
    ) -> int:
        """Store the full blocks of ``token_ids[:limit]`` not cached yet, head first, as far as room can
        be made without evicting blocks of this prefix; ``read(start, end)`` copies their K/V out of the
        request's KV row ([layers, kv_heads, end - start, head_dim] each). Returns the blocks added."""
        if not self.enabled:
            return 0
        ids = self.block_ids(owner, token_ids, limit)
        own = frozenset(ids)
        added = 0
        for b, bid in enumerate(ids):
            if bid in self._blocks:
                continue
            # Every block of one model has one size, so the room is known before the copy (no copy
            # made where only this prefix's own blocks are left to evict).
            size = next(iter(self._blocks.values())).nbytes if self._blocks else 0
            victims = self._victims(size, own)
            if victims is None:
                break
            k, v = read(b * self.block_tokens, (b + 1) * self.block_tokens)  # before evicting: it may fail
            block = PrefixBlock(k, v)
            if block.nbytes != size:  # the cache was empty: its size is known only now
                victims = self._victims(block.nbytes, own)
                if victims is None:  # larger than the cache
                    break
            self._evict(victims)
            self._blocks[bid] = block
            self.bytes_used += block.nbytes
            added += 1
        for bid in reversed(ids):  # the head ends up the most recent: tails are evicted first
            if bid in self._blocks:
                self._blocks.move_to_end(bid)
        return added

    def clear(self) -> None:
        self._blocks.clear()
        self.bytes_used = 0

    def _victims(self, nbytes: int, keep: frozenset[bytes]) -> list[bytes] | None:
        """The least recently used blocks, none of ``keep``, whose eviction lets ``nbytes`` more fit
        (none where they fit already); None where no such blocks can make the room."""
        need = self.bytes_used + nbytes - self.max_bytes
        victims: list[bytes] = []
        for bid, block in self._blocks.items():  # least recently used first
            if need <= 0:
                break
            if bid not in keep:
                victims.append(bid)
                need -= block.nbytes
        return victims if need <= 0 else None

    def _evict(self, victims: list[bytes]) -> None:
        for bid in victims:
            self.bytes_used -= self._blocks.pop(bid).nbytes
        if victims and self.observer is not None:
            self.observer.prefix_evicted(len(victims))
