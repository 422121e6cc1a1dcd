"""BlockManager: free list, refcounts, prefix cache, LRU eviction, fork, flush."""

import subprocess
import sys

import pytest

from serving.engine.block_manager import BlockManager
from serving.engine.sequence import Sequence
from serving.engine.types import SamplingParams

PS = 4  # page size


def make_seq(tokens, req="r"):
    return Sequence(req, list(tokens), SamplingParams())


def compute_all(bm, seq):
    """Allocates and 'computes' every token of a fresh sequence, as one prefill."""
    bm.allocate(seq)
    n = seq.num_tokens - seq.num_computed_tokens
    assert bm.ensure_slots(seq, n)
    seq.num_computed_tokens += n
    bm.register_computed(seq)


def test_modules_do_not_import_jax():
    code = ("import sys; import serving.engine.block_manager, serving.engine.scheduler, "
            "serving.engine.sequence; assert 'jax' not in sys.modules, 'jax imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_scratch_page_never_handed_out():
    bm = BlockManager(num_pages=4, page_size=PS)
    assert bm.num_free_pages == 3
    seq = make_seq(range(12))
    bm.allocate(seq)
    assert bm.ensure_slots(seq, 12)
    assert sorted(seq.block_table) == [1, 2, 3]
    assert bm.num_free_pages == 0 and bm.usage == 1.0
    other = make_seq(range(100, 101))
    bm.allocate(other)
    assert not bm.ensure_slots(other, 1)
    assert other.block_table == []
    bm.check_invariants([seq, other])
    bm.free(seq)
    assert bm.num_free_pages == 3 and bm.num_used_pages == 0
    bm.check_invariants()


def test_ensure_slots_grows_one_page_at_a_time():
    bm = BlockManager(num_pages=8, page_size=PS)
    seq = make_seq(range(3))
    bm.allocate(seq)
    assert bm.ensure_slots(seq, 3) and len(seq.block_table) == 1
    seq.num_computed_tokens = 3
    seq.append_token(7)
    assert bm.ensure_slots(seq, 1) and len(seq.block_table) == 1  # slot 3 of page 0
    seq.num_computed_tokens = 4
    seq.append_token(8)
    assert bm.ensure_slots(seq, 1) and len(seq.block_table) == 2
    with pytest.raises(ValueError):
        bm.ensure_slots(seq, 2)  # past the end of the sequence


def test_prefix_cache_hit_shares_pages():
    bm = BlockManager(num_pages=16, page_size=PS)
    a = make_seq(list(range(10)))  # pages [0..3], [4..7] full, [8, 9] partial
    compute_all(bm, a)
    assert bm.num_cached_pages == 2
    b = make_seq(list(range(8)) + [50, 51, 52])
    assert bm.match_prefix(b) == 8
    assert bm.can_allocate(b)
    bm.allocate(b)
    assert b.num_computed_tokens == 8 and b.num_cached_tokens == 8
    assert b.block_table == a.block_table[:2]
    assert all(bm.refcount(p) == 2 for p in b.block_table)
    assert bm.ensure_slots(b, 3) and len(b.block_table) == 3
    bm.check_invariants([a, b])
    # no prefix cache when the group opts out (prompt logprobs)
    c = make_seq(list(range(8)) + [60])
    assert bm.match_prefix(c, use_prefix_cache=False) == 0
    bm.allocate(c, use_prefix_cache=False)
    assert c.num_computed_tokens == 0 and c.block_table == []


def test_hit_never_covers_the_whole_sequence():
    bm = BlockManager(num_pages=16, page_size=PS)
    compute_all(bm, make_seq(range(8)))
    same = make_seq(range(8))  # page aligned: the last page must be recomputed
    assert bm.match_prefix(same) == 4
    longer = make_seq(range(9))
    assert bm.match_prefix(longer) == 8


def test_hash_chain_depends_on_the_whole_prefix():
    bm = BlockManager(num_pages=16, page_size=PS)
    compute_all(bm, make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9]))
    # same second page, different first page: no hit at all
    assert bm.match_prefix(make_seq([0, 2, 3, 4, 5, 6, 7, 8, 9])) == 0


def test_freed_cached_pages_are_evictable_and_revived():
    bm = BlockManager(num_pages=8, page_size=PS)
    a = make_seq(range(9))
    compute_all(bm, a)
    pages = list(a.block_table)
    bm.free(a)
    assert bm.num_free_pages == 7 and bm.num_cached_pages == 2
    bm.check_invariants()
    b = make_seq(list(range(8)) + [99])
    assert bm.can_allocate(b)
    bm.allocate(b)
    assert b.block_table == pages[:2] and b.num_cached_tokens == 8
    assert bm.num_free_pages == 5
    bm.check_invariants([b])


def test_lru_eviction_order():
    bm = BlockManager(num_pages=5, page_size=PS)  # 4 usable pages
    a, b = make_seq([1] * 4 + [0]), make_seq([2] * 4 + [0])
    compute_all(bm, a)  # cached page [1,1,1,1] + partial
    compute_all(bm, b)  # cached page [2,2,2,2] + partial
    bm.free(a)
    bm.free(b)  # LRU: a's page, then b's page (both cached), partials on free list
    assert bm.num_cached_pages == 2
    # touch a's prefix again so b's page becomes the least recently used
    a2 = make_seq([1] * 4 + [5])
    bm.allocate(a2)
    assert a2.num_cached_tokens == 4
    bm.free(a2)
    # take 3 pages: 2 truly free first, then evict the LRU cached page (b's)
    c = make_seq([9] * 12)
    bm.allocate(c)
    assert bm.ensure_slots(c, 12)
    assert bm.match_prefix(make_seq([2] * 4 + [0])) == 0
    assert bm.match_prefix(make_seq([1] * 4 + [0])) == 4
    bm.check_invariants([c])


def test_can_allocate_counts_revived_pages():
    bm = BlockManager(num_pages=4, page_size=PS)  # 3 usable
    a = make_seq(range(9))
    compute_all(bm, a)
    bm.free(a)  # 2 cached evictable pages + 1 free
    b = make_seq(list(range(8)) + [7, 7, 7, 7, 7])  # hits 2 pages, needs 2 more
    assert not bm.can_allocate(b)
    assert bm.can_allocate(b, num_new_tokens=4)  # only up to the third page


def test_duplicate_content_keeps_first_page():
    bm = BlockManager(num_pages=16, page_size=PS)
    a, b = make_seq(range(5)), make_seq(range(5))
    for s in (a, b):
        bm.allocate(s)
        assert bm.ensure_slots(s, 5)
    for s in (a, b):
        s.num_computed_tokens = 5
        bm.register_computed(s)
    assert bm.num_cached_pages == 1
    bm.free(a)
    bm.free(b)
    assert bm.num_free_pages == 15
    bm.check_invariants()


def test_fork_shares_full_prompt_pages():
    bm = BlockManager(num_pages=16, page_size=PS, enable_prefix_caching=False)
    parent, child = make_seq(range(10)), make_seq(range(10))
    compute_all(bm, parent)
    parent.append_token(42)
    assert bm.fork(parent, child) == 8
    assert child.block_table == parent.block_table[:2]
    assert [bm.refcount(p) for p in parent.block_table] == [2, 2, 1]
    assert bm.ensure_slots(child, 2) and len(child.block_table) == 3
    assert child.block_table[2] != parent.block_table[2]
    bm.check_invariants([parent, child])
    bm.free(parent)
    bm.free(child)
    assert bm.num_free_pages == 15 and bm.num_cached_pages == 0
    bm.check_invariants([])


def test_fork_of_page_aligned_prompt_leaves_one_token():
    bm = BlockManager(num_pages=16, page_size=PS)
    parent, child = make_seq(range(8)), make_seq(range(8))
    compute_all(bm, parent)
    assert bm.fork(parent, child) == 4


def test_flush_prefix_cache():
    bm = BlockManager(num_pages=8, page_size=PS)
    a = make_seq(range(9))
    compute_all(bm, a)
    assert not bm.flush_prefix_cache()  # a still holds pages
    assert bm.num_cached_pages == 2
    bm.free(a)
    assert bm.flush_prefix_cache()
    assert bm.num_cached_pages == 0 and bm.num_free_pages == 7
    assert bm.match_prefix(make_seq(range(9))) == 0
    bm.check_invariants()


def test_double_free_is_detected():
    bm = BlockManager(num_pages=8, page_size=PS)
    a = make_seq(range(3))
    bm.allocate(a)
    bm.ensure_slots(a, 3)
    table = list(a.block_table)
    bm.free(a)
    a.block_table = table
    with pytest.raises(RuntimeError):
        bm.free(a)
