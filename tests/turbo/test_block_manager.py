import pytest

from lmcompress.turbo import block_manager as bm_module
from lmcompress.turbo.block_manager import BlockManager
from lmcompress.turbo.sequence import Sequence


def compute_all(bm: BlockManager, seq: Sequence) -> int:
    """Admit `seq`, pretend the model computed all its tokens, register full blocks; returns cached tokens."""
    prefix = bm.find_cached_prefix(seq)
    assert bm.allocate_slots(seq, seq.num_tokens - prefix.num_tokens, prefix)
    seq.num_computed_tokens = seq.num_tokens
    bm.cache_full_blocks(seq)
    return prefix.num_tokens


def ref_counts(bm: BlockManager) -> list[int]:
    return [block.ref_count for block in bm._blocks]


def test_allocation_grows_one_block_per_block_size_tokens():
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = Sequence("a", range(5))
    assert bm.allocate_slots(seq, 5)
    assert len(seq.block_table) == 2
    seq.num_computed_tokens = 5
    assert bm.allocate_slots(seq, 3)  # fills block 2 exactly
    assert len(seq.block_table) == 2
    seq.num_computed_tokens = 8
    assert bm.allocate_slots(seq, 1)
    assert len(seq.block_table) == 3 and len(set(seq.block_table)) == 3
    assert bm.num_free_blocks == 5
    assert bm.usage == pytest.approx(3 / 8)


def test_allocation_is_all_or_nothing():
    bm = BlockManager(num_blocks=2, block_size=4)
    seq = Sequence("a", range(9))
    assert not bm.can_allocate(3)
    assert not bm.allocate_slots(seq, 9)
    assert seq.block_table == [] and bm.num_free_blocks == 2


def test_prefix_hit_shares_full_blocks_and_counts_tokens():
    bm = BlockManager(num_blocks=8, block_size=4)
    first = Sequence("a", [1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    assert compute_all(bm, first) == 0
    second = Sequence("b", [1, 2, 3, 4, 5, 6, 7, 8, 42])
    assert compute_all(bm, second) == 8
    assert second.block_table[:2] == first.block_table[:2]
    assert second.block_table[2] not in first.block_table
    assert [ref_counts(bm)[b] for b in first.block_table] == [2, 2, 1]
    assert (bm.prefix_cache_queries, bm.prefix_cache_hits) == (10 + 9, 8)


def test_whole_prompt_hit_leaves_the_last_token_to_compute():
    bm = BlockManager(num_blocks=8, block_size=4)
    compute_all(bm, Sequence("a", range(8)))
    again = Sequence("b", range(8))
    prefix = bm.find_cached_prefix(again)
    assert prefix.num_tokens == 4  # block 2 holds the last token, whose logits are needed


def test_hit_needs_the_same_prefix_not_just_the_same_block():
    bm = BlockManager(num_blocks=8, block_size=4)
    compute_all(bm, Sequence("a", [1, 1, 1, 1, 2, 2, 2, 2, 3]))
    other_start = Sequence("b", [9, 9, 9, 9, 2, 2, 2, 2, 3])
    assert bm.find_cached_prefix(other_start).num_tokens == 0


def test_hash_collision_never_returns_a_block_with_other_content(monkeypatch):
    monkeypatch.setattr(bm_module, "block_hash", lambda parent_hash, token_ids: 0)
    bm = BlockManager(num_blocks=8, block_size=4)
    first = Sequence("a", [1, 1, 1, 1, 1, 1, 1, 1, 7])
    compute_all(bm, first)
    # Same hash, other tokens: a miss, not first's block.
    assert bm.find_cached_prefix(Sequence("b", [2, 2, 2, 2, 9])).num_tokens == 0
    # Block 1 has block 0's tokens and (forced) hash, but a different prefix: only block 0 may hit.
    assert bm.find_cached_prefix(Sequence("c", [1] * 8 + [5])).block_ids == (first.block_table[0],)


def test_a_child_never_outlives_its_parent_block_being_reused(monkeypatch):
    # A hash that ignores the parent: equal tokens collide whatever precedes them.
    monkeypatch.setattr(bm_module, "block_hash", lambda parent_hash, token_ids: hash(token_ids))
    bm = BlockManager(num_blocks=8, block_size=2)
    holder, twin = Sequence("z", [5, 5, 0]), Sequence("a", [5, 5, 2, 2, 9])
    for seq in (holder, twin):  # both admitted before either registers: no sharing
        assert bm.allocate_slots(seq, seq.num_tokens)
    for seq in (holder, twin):
        seq.num_computed_tokens = seq.num_tokens
        bm.cache_full_blocks(seq)
    # twin's [5, 5] block stays out of the map (holder's is there), its [2, 2] child gets in.
    parent_id, child_id = twin.block_table[:2]
    bm.free(twin)  # the uncached parent is reused first, the cached child survives
    reuser = Sequence("b", [1, 1, 7])
    compute_all(bm, reuser)
    assert reuser.block_table[0] == parent_id
    # [1, 1] now lives in the parent's old block; the child there was computed after [5, 5].
    probe = Sequence("d", [1, 1, 2, 2, 8])
    assert bm.find_cached_prefix(probe).block_ids == (parent_id,)
    assert child_id not in bm.find_cached_prefix(probe).block_ids


def test_without_collisions_the_same_lookup_hits_both_blocks():
    bm = BlockManager(num_blocks=8, block_size=4)
    first = Sequence("a", [1, 1, 1, 1, 1, 1, 1, 1, 7])
    compute_all(bm, first)
    assert bm.find_cached_prefix(Sequence("c", [1] * 8 + [5])).block_ids == tuple(first.block_table[:2])


def test_blocks_become_cached_only_when_full_and_computed():
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = Sequence("a", range(10))
    assert bm.allocate_slots(seq, 6)  # a 6-token chunk: block 0 full, block 1 half
    seq.num_computed_tokens = 6
    bm.cache_full_blocks(seq)
    probe = Sequence("p", range(10))
    assert bm.find_cached_prefix(probe).num_tokens == 4
    assert bm.allocate_slots(seq, 4)
    seq.num_computed_tokens = 10
    bm.cache_full_blocks(seq)
    assert bm.find_cached_prefix(probe).num_tokens == 8


def test_output_tokens_are_cached_too():
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = Sequence("a", [1, 2, 3])
    compute_all(bm, seq)
    seq.output_token_ids += [4, 5]
    assert bm.allocate_slots(seq, 2)
    seq.num_computed_tokens = 5
    bm.cache_full_blocks(seq)
    assert bm.find_cached_prefix(Sequence("b", [1, 2, 3, 4, 5])).num_tokens == 4


def test_free_keeps_shared_blocks_until_the_last_reference():
    bm = BlockManager(num_blocks=8, block_size=4)
    first, second = Sequence("a", range(9)), Sequence("b", range(9))
    compute_all(bm, first)
    compute_all(bm, second)
    shared = first.block_table[:2]
    bm.free(first)
    assert first.block_table == []
    assert [ref_counts(bm)[b] for b in shared] == [1, 1]
    assert bm.num_free_blocks == 8 - 3
    bm.free(second)
    assert bm.num_free_blocks == 8 and sum(ref_counts(bm)) == 0


def test_freed_blocks_stay_cached_until_reused():
    bm = BlockManager(num_blocks=2, block_size=4)
    seq = Sequence("a", range(8))
    compute_all(bm, seq)
    bm.free(seq)
    assert bm.num_free_blocks == 2
    assert bm.find_cached_prefix(Sequence("b", range(9))).num_tokens == 8
    compute_all(bm, Sequence("c", [50, 51, 52, 53]))  # reuses the tail block: its content is evicted
    assert bm.find_cached_prefix(Sequence("b", range(9))).num_tokens == 4


def test_lru_evicts_least_recently_freed_and_tails_first():
    bm = BlockManager(num_blocks=4, block_size=2)
    old, new = Sequence("old", [1, 1, 2, 2]), Sequence("new", [3, 3, 4, 4])
    compute_all(bm, old)
    compute_all(bm, new)
    bm.free(old)
    bm.free(new)
    # One fresh block: taken from `old`, and from its tail (block [2, 2]), first.
    compute_all(bm, Sequence("x", [9]))
    assert bm.find_cached_prefix(Sequence("q", [1, 1, 2, 2, 0])).num_tokens == 2
    assert bm.find_cached_prefix(Sequence("q", [3, 3, 4, 4, 0])).num_tokens == 4


def test_a_hit_makes_blocks_recently_used_again():
    bm = BlockManager(num_blocks=4, block_size=2)
    old, new = Sequence("old", [1, 1, 2, 2]), Sequence("new", [3, 3, 4, 4])
    compute_all(bm, old)
    compute_all(bm, new)
    bm.free(old)
    bm.free(new)
    reader = Sequence("r", [1, 1, 2, 2, 5])
    assert compute_all(bm, reader) == 4  # revives old's blocks; needs 1 fresh block (new's tail)
    bm.free(reader)
    compute_all(bm, Sequence("x", [9, 9, 9]))  # 2 fresh blocks: the rest of `new` goes first
    assert bm.find_cached_prefix(Sequence("q", [1, 1, 2, 2, 0])).num_tokens == 4
    assert bm.find_cached_prefix(Sequence("q", [3, 3, 4, 4, 0])).num_tokens == 0


def test_uncached_freed_blocks_are_reused_before_cached_ones():
    bm = BlockManager(num_blocks=2, block_size=2)
    cached, partial = Sequence("c", [1, 1]), Sequence("p", [7])
    compute_all(bm, cached)
    compute_all(bm, partial)
    bm.free(cached)
    bm.free(partial)  # freed last, but holds nothing reusable
    compute_all(bm, Sequence("x", [8]))
    assert bm.find_cached_prefix(Sequence("q", [1, 1, 0])).num_tokens == 2


def test_duplicates_computed_side_by_side_keep_the_chain_reachable():
    bm = BlockManager(num_blocks=8, block_size=2)
    twins = [Sequence(name, [1, 1, 2, 2, 3]) for name in ("a", "b")]
    for seq in twins:  # both admitted before either registers: no sharing
        assert bm.allocate_slots(seq, 5)
    for seq in twins:
        seq.num_computed_tokens = 5
        bm.cache_full_blocks(seq)
    assert bm.find_cached_prefix(Sequence("c", [1, 1, 2, 2, 3])).num_tokens == 4


def test_twin_chain_registered_first_does_not_block_the_cached_chain():
    bm = BlockManager(num_blocks=8, block_size=2)
    slow, fast = Sequence("slow", [1, 1, 2, 2, 3]), Sequence("fast", [1, 1, 2, 2, 3])
    for seq in (slow, fast):
        assert bm.allocate_slots(seq, 5)
    slow.num_computed_tokens = 2  # a 2-token chunk: registers [1, 1] first
    bm.cache_full_blocks(slow)
    fast.num_computed_tokens = 5  # registers its twin of [1, 1] and, under it, [2, 2]
    bm.cache_full_blocks(fast)
    probe = Sequence("c", [1, 1, 2, 2, 3])
    assert bm.find_cached_prefix(probe).num_tokens == 2  # fast's [2, 2] hangs off the uncached twin
    slow.num_computed_tokens = 5
    bm.cache_full_blocks(slow)  # takes over the [2, 2] entry, since lookups cannot reach fast's
    assert bm.find_cached_prefix(probe).num_tokens == 4


def test_disabled_prefix_caching_never_hits_or_counts():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    compute_all(bm, Sequence("a", range(9)))
    assert compute_all(bm, Sequence("b", range(9))) == 0
    assert (bm.prefix_cache_queries, bm.prefix_cache_hits) == (0, 0)
    assert bm.num_free_blocks == 8 - 6
