"""Paged KV-cache bookkeeping with automatic prefix caching.

The KV cache is ``num_pages`` pages of ``page_size`` token slots; a sequence's
``block_table`` lists its pages and token ``i`` lives in slot
``block_table[i // page_size] * page_size + i % page_size``. Page 0 is a
scratch page (padding writes go there) and is never handed out.

Every usable page is in exactly one state:

* free: refcount 0, no cached content, on the free list;
* in use: refcount > 0 (several sequences share a page after a prefix-cache
  hit or a fork);
* evictable: refcount 0 but its content is cached, kept in LRU order and
  reclaimed only when the free list is empty.

Prefix caching keys a *full, computed* page by a hash chain: the key of page
``i`` hashes the key of page ``i - 1`` with the page's token ids (blake2b; the
tokens are also compared on a hit). Only full pages whose tokens were all
computed are shared and nobody writes into a full page, so sharing never
changes outputs and needs no copy-on-write.

No jax import here.
"""

from __future__ import annotations

import array
import collections
import hashlib
import logging
from typing import Iterable, Optional

from serving.engine.sequence import Sequence

logger = logging.getLogger(__name__)

SCRATCH_PAGE = 0


def hash_page(parent: bytes, token_ids: Iterable[int]) -> bytes:
    """Key of a full page: a 16-byte blake2b of the parent key and the tokens."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(array.array("q", token_ids).tobytes())
    return h.digest()


class BlockManager:
    """Owns the free list, reference counts and prefix-cache map of KV pages.

    Args:
        num_pages: Pages in the KV cache, including scratch page 0.
        page_size: Token slots per page.
        enable_prefix_caching: Keep full computed pages after release so later
            sequences with the same prefix reuse them.
    """

    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = True):
        if num_pages < 2:
            raise ValueError(f"num_pages must be at least 2 (page 0 is scratch), got {num_pages}")
        if page_size < 1:
            raise ValueError(f"page_size must be positive, got {page_size}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_prefix_caching = enable_prefix_caching
        self._refcount = [0] * num_pages
        self._free: collections.deque[int] = collections.deque(range(1, num_pages))
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()  # LRU first
        self._cache: dict[bytes, int] = {}  # key -> page
        self._page_key: list[Optional[bytes]] = [None] * num_pages
        self._page_tokens: list[Optional[tuple[int, ...]]] = [None] * num_pages
        self._num_registered: dict[int, int] = {}  # seq_id -> leading pages already keyed

    # ------------------------------------------------------------------ stats
    @property
    def num_usable_pages(self) -> int:
        return self.num_pages - 1

    @property
    def num_free_pages(self) -> int:
        """Pages an allocation can take: free plus evictable cached pages."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used_pages(self) -> int:
        """Pages referenced by at least one sequence."""
        return self.num_usable_pages - self.num_free_pages

    @property
    def usage(self) -> float:
        """Fraction of usable pages referenced by sequences."""
        return self.num_used_pages / self.num_usable_pages

    @property
    def num_cached_pages(self) -> int:
        """Pages holding a prefix-cache entry, referenced or evictable."""
        return len(self._cache)

    def refcount(self, page: int) -> int:
        return self._refcount[page]

    # -------------------------------------------------------------- hashing
    def _page_hash(self, seq: Sequence, i: int) -> bytes:
        """Key of the ``i``-th full page of ``seq`` (extends the seq's chain)."""
        hashes, ps, tokens = seq.page_hashes, self.page_size, seq.all_token_ids
        while len(hashes) <= i:
            j = len(hashes)
            parent = hashes[j - 1] if j else b""
            hashes.append(hash_page(parent, tokens[j * ps:(j + 1) * ps]))
        return hashes[i]

    def _match(self, seq: Sequence) -> list[int]:
        """Cached pages for the longest prefix of ``seq``, leaving >= 1 token to compute."""
        if not self.enable_prefix_caching:
            return []
        ps, tokens = self.page_size, seq.all_token_ids
        pages = []
        for i in range((seq.num_tokens - 1) // ps):
            page = self._cache.get(self._page_hash(seq, i))
            if page is None or self._page_tokens[page] != tuple(tokens[i * ps:(i + 1) * ps]):
                break
            pages.append(page)
        return pages

    def match_prefix(self, seq: Sequence, use_prefix_cache: bool = True) -> int:
        """Tokens of ``seq`` the prefix cache would serve now (read only)."""
        return len(self._match(seq)) * self.page_size if use_prefix_cache else 0

    # ----------------------------------------------------------- allocation
    def _pages_needed(self, seq: Sequence, num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.page_size) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_new_tokens: Optional[int] = None,
                     use_prefix_cache: bool = True) -> bool:
        """Whether :meth:`allocate` then ``ensure_slots(seq, num_new_tokens)`` fits.

        Args:
            seq: A sequence holding no pages.
            num_new_tokens: Tokens to compute after the cached prefix; None
                means all the rest of the sequence.
            use_prefix_cache: Count prefix-cache hits.
        """
        hits = self._match(seq) if use_prefix_cache else []
        cached = len(hits) * self.page_size
        if num_new_tokens is None:
            num_new_tokens = seq.num_tokens - cached
        new_pages = -(-(cached + num_new_tokens) // self.page_size) - len(hits)
        revived = sum(1 for p in hits if self._refcount[p] == 0)  # leave the evictable pool
        return new_pages + revived <= self.num_free_pages

    def allocate(self, seq: Sequence, use_prefix_cache: bool = True) -> None:
        """Admits ``seq``: claims its cached prefix pages (no new pages yet).

        Sets ``seq.num_computed_tokens`` to the cached token count and, on the
        first admission, ``seq.num_cached_tokens``. Call :meth:`ensure_slots`
        for the tokens to compute.
        """
        if seq.block_table:
            raise ValueError(f"{seq} already holds pages")
        hits = self._match(seq) if use_prefix_cache else []
        for page in hits:
            self._incref(page)
        seq.block_table = hits
        seq.num_computed_tokens = len(hits) * self.page_size
        if seq.num_preemptions == 0:
            seq.num_cached_tokens = seq.num_computed_tokens
        self._num_registered[seq.seq_id] = len(hits)
        if hits:
            logger.debug("seq %d: prefix cache hit, %d tokens", seq.seq_id, seq.num_computed_tokens)

    def ensure_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Allocates pages so tokens up to ``num_computed + num_new_tokens`` have slots.

        Returns:
            False (allocating nothing) if there are not enough pages.
        """
        end = seq.num_computed_tokens + num_new_tokens
        if end > seq.num_tokens:
            raise ValueError(f"{seq}: {num_new_tokens} new tokens run past the sequence end")
        needed = self._pages_needed(seq, end)
        if needed > self.num_free_pages:
            return False
        for _ in range(needed):
            seq.block_table.append(self._take_page())
        return True

    def fork(self, parent: Sequence, child: Sequence) -> int:
        """Shares the parent's full computed prompt pages with ``child``.

        The child keeps at least one token to compute so it gets its own
        logits; it recomputes only the tail after the shared pages.

        Returns:
            The number of shared tokens (``child.num_computed_tokens``).
        """
        if child.block_table:
            raise ValueError(f"{child} already holds pages")
        if parent.prompt_token_ids != child.prompt_token_ids:
            raise ValueError("fork needs sequences with the same prompt")
        ps = self.page_size
        num_shared = min(parent.num_computed_tokens // ps, len(parent.block_table),
                         child.num_prompt_tokens // ps, (child.num_tokens - 1) // ps)
        pages = parent.block_table[:num_shared]
        for page in pages:
            self._incref(page)
        child.block_table = list(pages)
        child.num_computed_tokens = num_shared * ps
        self._num_registered[child.seq_id] = num_shared
        return child.num_computed_tokens

    def register_computed(self, seq: Sequence) -> None:
        """Adds the pages of ``seq`` that became full and computed to the prefix cache."""
        if not self.enable_prefix_caching:
            return
        ps = self.page_size
        start = self._num_registered.get(seq.seq_id, 0)
        end = min(seq.num_computed_tokens // ps, len(seq.block_table))
        tokens = seq.all_token_ids
        for i in range(start, end):
            page = seq.block_table[i]
            if self._page_key[page] is not None:
                continue  # shared page, already cached
            key = self._page_hash(seq, i)
            if key in self._cache:
                continue  # same content computed by another sequence; keep that one
            self._cache[key] = page
            self._page_key[page] = key
            self._page_tokens[page] = tuple(tokens[i * ps:(i + 1) * ps])
        self._num_registered[seq.seq_id] = max(start, end)

    def free(self, seq: Sequence) -> None:
        """Releases the pages of ``seq`` and resets ``num_computed_tokens`` to 0.

        Cached pages whose refcount drops to 0 become evictable (the tail of a
        sequence first, so prefixes outlive their extensions); the others go
        back to the free list.
        """
        for page in reversed(seq.block_table):
            self._refcount[page] -= 1
            if self._refcount[page] < 0:
                raise RuntimeError(f"page {page} refcount below zero (double free of {seq})")
            if self._refcount[page] == 0:
                if self._page_key[page] is not None:
                    self._evictable[page] = None
                else:
                    self._free.append(page)
        seq.block_table = []
        seq.num_computed_tokens = 0
        self._num_registered.pop(seq.seq_id, None)

    def flush_prefix_cache(self) -> bool:
        """Drops every prefix-cache entry; refuses (False) while any page is in use."""
        if self.num_used_pages:
            logger.warning("flush_prefix_cache refused: %d pages in use", self.num_used_pages)
            return False
        for page in self._evictable:
            self._clear_key(page)
            self._free.append(page)
        self._evictable.clear()
        self._cache.clear()
        logger.info("prefix cache flushed")
        return True

    # ------------------------------------------------------------ internals
    def _incref(self, page: int) -> None:
        if self._refcount[page] == 0:
            del self._evictable[page]
        self._refcount[page] += 1

    def _take_page(self) -> int:
        if self._free:
            page = self._free.popleft()
        else:
            page, _ = self._evictable.popitem(last=False)
            self._clear_key(page)
        self._refcount[page] = 1
        return page

    def _clear_key(self, page: int) -> None:
        key = self._page_key[page]
        if key is not None and self._cache.get(key) == page:
            del self._cache[key]
        self._page_key[page] = None
        self._page_tokens[page] = None

    def check_invariants(self, seqs: Optional[Iterable[Sequence]] = None) -> None:
        """Raises AssertionError if the bookkeeping is inconsistent.

        Args:
            seqs: If given, every sequence holding pages; refcounts must equal
                the number of block-table references.
        """
        free, evictable = set(self._free), set(self._evictable)
        assert len(free) == len(self._free), "duplicate page on the free list"
        assert SCRATCH_PAGE not in free and SCRATCH_PAGE not in evictable, "scratch page handed out"
        assert self._refcount[SCRATCH_PAGE] == 0, "scratch page referenced"
        assert not free & evictable, "page both free and evictable"
        for page in range(1, self.num_pages):
            rc = self._refcount[page]
            assert rc >= 0, f"page {page} refcount {rc}"
            in_pools = (page in free) + (page in evictable)
            assert (rc > 0) + in_pools == 1, f"page {page}: refcount {rc}, pools {in_pools}"
            if page in free:
                assert self._page_key[page] is None, f"free page {page} still cached"
            if page in evictable:
                assert self._page_key[page] is not None, f"evictable page {page} not cached"
        for key, page in self._cache.items():
            assert self._page_key[page] == key, f"cache entry of page {page} mismatched"
        assert sum(k is not None for k in self._page_key) == len(self._cache), "stale page keys"
        if seqs is not None:
            counts = [0] * self.num_pages
            for seq in seqs:
                for page in seq.block_table:
                    counts[page] += 1
            assert counts == self._refcount, "refcounts differ from block-table references"
