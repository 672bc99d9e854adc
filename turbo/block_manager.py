"""The paged KV cache's bookkeeping: block ids, reference counts and the prefix cache.

The pool is `num_blocks` fixed blocks of `block_size` tokens, preallocated by the
model runner; this module only decides which block id holds which tokens.

Automatic prefix caching (vLLM V1 style): once a block is full and its K/V is
computed it is registered under hash(parent block's hash, its tokens), so the
hash names the whole prefix up to the block's end.  A new sequence reuses the
longest chain of registered blocks matching its tokens.  A hit is trusted only
after comparing the stored tokens and the exact parent block (id and generation),
so a hash collision costs a cache miss, never wrong K/V.

Blocks whose reference count drops to 0 keep their contents and join an LRU free
list; they are evicted (unregistered) only when handed out again.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from lmcompress.turbo.sequence import Sequence


def block_hash(parent_hash: int | None, token_ids: tuple[int, ...]) -> int:
    """Chained hash of a full block: it identifies every token from position 0 to the block's end."""
    return hash((parent_hash, token_ids))


@dataclass
class _Block:
    block_id: int
    ref_count: int = 0
    # Bumped on every reuse, so a child that remembers (parent id, generation)
    # can tell its parent block was since overwritten with other tokens.
    generation: int = 0
    # Set once the block is full and computed; cleared on reuse.
    hash: int | None = None
    token_ids: tuple[int, ...] = ()
    parent: tuple[int, int] | None = None  # (block_id, generation) of the previous block


@dataclass(frozen=True)
class CachedPrefix:
    """Leading full blocks of a sequence found in the prefix cache."""

    block_ids: tuple[int, ...]
    block_size: int

    @property
    def num_tokens(self) -> int:
        return len(self.block_ids) * self.block_size


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._blocks = [_Block(i) for i in range(num_blocks)]
        # Blocks with ref_count 0 in eviction order (first = evicted next); values unused.
        # An OrderedDict gives O(1) pop-oldest, append and removal of a cache hit.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[int, int] = {}  # block hash -> block id
        # Prefix-cache statistics, in tokens, counted when a new sequence is admitted.
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    @property
    def num_free_blocks(self) -> int:
        """Blocks not used by any sequence (cached-but-unused blocks count as free)."""
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of the pool held by sequences, 0.0 to 1.0."""
        return 1.0 - len(self._free) / self.num_blocks

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold `num_tokens` tokens."""
        return -(-num_tokens // self.block_size)

    def find_cached_prefix(self, seq: Sequence) -> CachedPrefix:
        """The longest run of leading full blocks of `seq` whose K/V is cached; changes nothing.

        Stops one token short of the sequence: the last token must be computed to
        produce the logits for the next one.
        """
        if not self.enable_prefix_caching:
            return CachedPrefix((), self.block_size)
        found: list[int] = []
        parent: _Block | None = None
        for index in range((seq.num_tokens - 1) // self.block_size):
            tokens = seq.token_slice(index * self.block_size, (index + 1) * self.block_size)
            block_id = self._cached.get(block_hash(parent.hash if parent else None, tokens))
            if block_id is None or not self._matches(self._blocks[block_id], tokens, parent):
                break
            parent = self._blocks[block_id]
            found.append(block_id)
        return CachedPrefix(tuple(found), self.block_size)

    def allocate_slots(self, seq: Sequence, num_new_tokens: int, prefix: CachedPrefix | None = None) -> bool:
        """Make room for `num_new_tokens` more tokens after seq.num_computed_tokens; all or nothing.

        For a sequence being admitted (empty block table), pass the CachedPrefix
        from find_cached_prefix: its blocks are shared instead of recomputed and
        the new tokens go after them; the caller then sets num_computed_tokens to
        prefix.num_tokens.  Returns False, changing nothing, when the free blocks
        do not suffice.
        """
        if prefix is None and (seq.num_computed_tokens + num_new_tokens) <= len(seq.block_table) * self.block_size:
            return True  # the common decode step: the last block still has room
        shared = prefix.block_ids if prefix else ()
        computed = prefix.num_tokens if prefix else seq.num_computed_tokens
        num_new_blocks = max(self.blocks_for(computed + num_new_tokens) - len(seq.block_table) - len(shared), 0)
        # A hit on a block nobody uses takes it off the free list as well.
        num_revived = sum(1 for b in shared if self._blocks[b].ref_count == 0)
        if not self.can_allocate(num_new_blocks + num_revived):
            return False
        for block_id in shared:
            self._take(block_id)
        seq.block_table.extend(shared)
        seq.block_table.extend(self._pop_free() for _ in range(num_new_blocks))
        if prefix is not None and self.enable_prefix_caching:
            self.prefix_cache_queries += seq.num_tokens
            self.prefix_cache_hits += prefix.num_tokens
        return True

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register the blocks of `seq` that are now full and computed, so later requests can hit them."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        # Registered blocks form a prefix of the table: walk back to its end.
        first_new = num_full
        while first_new > 0 and self._blocks[seq.block_table[first_new - 1]].hash is None:
            first_new -= 1
        for index in range(first_new, num_full):
            self._register(seq, index)

    def free(self, seq: Sequence) -> None:
        """Drop the sequence's references; blocks nobody else uses become free but stay cached."""
        # Tail blocks first, so they are evicted before the prefix blocks other
        # requests are more likely to share.
        for block_id in reversed(seq.block_table):
            block = self._blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._release(block)
        seq.block_table.clear()

    def _matches(self, block: _Block, tokens: tuple[int, ...], parent: _Block | None) -> bool:
        expected_parent = (parent.block_id, parent.generation) if parent else None
        return block.token_ids == tokens and block.parent == expected_parent

    def _register(self, seq: Sequence, index: int) -> None:
        block = self._blocks[seq.block_table[index]]
        parent = self._blocks[seq.block_table[index - 1]] if index > 0 else None
        block.token_ids = seq.token_slice(index * self.block_size, (index + 1) * self.block_size)
        block.parent = (parent.block_id, parent.generation) if parent else None
        # Children hash from this value even if another block keeps the map entry.
        block.hash = block_hash(parent.hash if parent else None, block.token_ids)
        holder = self._cached.get(block.hash)
        # Keep a holder that lookups can still reach (say a twin computed in the same
        # step); replace one hanging off a parent that is no longer the cached block
        # for its tokens, or that prefix would stay a miss from this block on.
        if holder is None or not self._reachable(self._blocks[holder]):
            self._cached[block.hash] = block.block_id

    def _is_cached(self, block: _Block) -> bool:
        return block.hash is not None and self._cached.get(block.hash) == block.block_id

    def _reachable(self, block: _Block) -> bool:
        """Whether a lookup can step onto `block`: its parent still holds the same tokens and is cached."""
        if block.parent is None:
            return True
        parent_id, generation = block.parent
        parent = self._blocks[parent_id]
        return parent.generation == generation and self._is_cached(parent)

    def _release(self, block: _Block) -> None:
        self._free[block.block_id] = None
        if not self._is_cached(block):
            # Nothing worth keeping: hand it out before any cached block.
            self._free.move_to_end(block.block_id, last=False)

    def _take(self, block_id: int) -> None:
        block = self._blocks[block_id]
        if block.ref_count == 0:
            del self._free[block_id]
        block.ref_count += 1

    def _pop_free(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block = self._blocks[block_id]
        if self._is_cached(block):
            del self._cached[block.hash]
        block.generation += 1
        block.hash, block.token_ids, block.parent = None, (), None
        block.ref_count = 1
        return block_id
