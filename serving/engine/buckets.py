"""Bucketed step shapes: every compiled step has one of these shapes.

A step's real sizes are rounded up to the smallest bucket that holds them, so
jit compiles a small, fixed set of programs (all of them at start-up).
"""

from __future__ import annotations

import dataclasses


def powers_of_two(lo: int, hi: int) -> tuple[int, ...]:
    """Powers of two from ``lo`` up to and including the first one >= ``hi``."""
    out, p = [], max(1, lo)
    while True:
        out.append(p)
        if p >= hi:
            return tuple(out)
        p *= 2


def spaced_down(top: int, factor: int, floor: int) -> tuple[int, ...]:
    """``top, top/factor, ...`` (>= floor), ascending."""
    out = [top]
    while out[-1] // factor >= floor:
        out.append(out[-1] // factor)
    return tuple(sorted(set(out)))


def round_up(value: int, buckets: tuple[int, ...]) -> int:
    """Smallest bucket >= value; ValueError if none."""
    for b in buckets:
        if b >= value:
            return b
    raise ValueError(f"{value} exceeds the largest bucket {buckets[-1]}")


@dataclasses.dataclass(frozen=True)
class BucketPlan:
    """The shape buckets of one engine.

    decode_seqs: batch sizes of decode steps (one token per sequence).
    prefill_tokens: token counts of prefill chunks (one sequence per call).
    ctx_pages: widths of the block table (pages of context per sequence).
    """

    decode_seqs: tuple[int, ...]
    prefill_tokens: tuple[int, ...]
    ctx_pages: tuple[int, ...]
    page_size: int = 16

    @classmethod
    def build(cls, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int,
              page_size: int, decode: tuple[int, ...] = (), prefill: tuple[int, ...] = ()
              ) -> "BucketPlan":
        max_pages = -(-max_model_len // page_size)
        pow2_pages = powers_of_two(1, max_pages)[-1]
        return cls(
            decode_seqs=tuple(sorted(decode)) or powers_of_two(1, max_num_seqs),
            prefill_tokens=tuple(sorted(prefill)) or powers_of_two(
                16, min(max_num_batched_tokens, max_model_len)),
            # Decode attention on the XLA path costs in proportion to the
            # bucketed context, so contexts step by 2x (at most 2x padding).
            ctx_pages=spaced_down(pow2_pages, 2, min(4, pow2_pages)),
            page_size=page_size,
        )

    def all_shapes(self) -> list[tuple[str, int, int]]:
        """Every (kind, size, ctx_pages) the engine may run."""
        shapes = [("decode", s, p) for s in self.decode_seqs for p in self.ctx_pages]
        prev = (0,) + self.prefill_tokens[:-1]
        # A chunk of more than prev[i] tokens needs at least that much context.
        shapes += [("prefill", t, p) for t, lo in zip(self.prefill_tokens, prev)
                   for p in self.ctx_pages if lo + 1 <= p * self.page_size]
        return shapes
