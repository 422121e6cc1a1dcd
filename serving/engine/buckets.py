"""Bucketed step shapes: every compiled step has one of these shapes.

One engine step is one ragged call: every scheduled sequence's tokens (decode
rows and prefill chunks alike) packed token-major. Its real token count is
rounded up to a *token bucket* ``T``; the batch has ``num_seqs(T) = min(T,
max_num_seqs)`` sequence rows (a step of ``T`` tokens holds at most ``T``
sequences). Backends that read KV pages in place (the C++ CPU kernel, the
Pallas kernels) take one block-table width, ``max_model_len`` worth of pages,
so the program set is one program per token bucket. The pure-JAX reference
gathers the pages it is given, so it keeps context buckets, and compiles a
separate program for decode-only batches (its cost grows with ``max_q_len``).
"""

from __future__ import annotations

import dataclasses

IN_PLACE_BACKENDS = ("cpu", "pallas_tpu", "pallas_gpu", "pallas_tpu_interpret",
                     "pallas_gpu_interpret")


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
class StepShape:
    """The static shape of one compiled step (the key of its program)."""

    num_tokens: int  # T: padded tokens
    num_seqs: int  # S: padded sequence rows (sampled rows)
    ctx_pages: int  # block-table width
    max_q_len: int  # static bound on a sequence's query length (1 or T)

    def describe(self) -> str:
        return (f"T={self.num_tokens} S={self.num_seqs} pages={self.ctx_pages}"
                f"{' decode' if self.max_q_len == 1 else ''}")


@dataclasses.dataclass(frozen=True)
class BucketPlan:
    """The shape buckets of one engine.

    token_buckets: padded token counts of a step (ascending).
    max_num_seqs: the most sequence rows of a step.
    ctx_pages: block-table widths; one (``max_model_len``'s pages) for
        backends that read pages in place.
    in_place: whether the attention backend reads pages in place (one
        context width, ``max_q_len = T``); else the reference's buckets.
    """

    token_buckets: tuple[int, ...]
    max_num_seqs: int
    ctx_pages: tuple[int, ...]
    page_size: int = 16
    in_place: bool = True

    @classmethod
    def build(cls, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int,
              page_size: int, decode: tuple[int, ...] = (), prefill: tuple[int, ...] = (),
              backend: str = "cpu") -> "BucketPlan":
        """The plan for an engine's limits.

        ``decode``/``prefill`` (the ``--decode-buckets`` / ``--prefill-buckets``
        flags) replace the default token buckets below / above
        ``max_num_seqs``; the largest bucket always holds a full step
        (``max_num_batched_tokens`` tokens and ``max_num_seqs`` one-token rows).
        """
        top = max(max_num_batched_tokens, max_num_seqs)
        # up to max_num_seqs (mostly decode batches): steps of 4x, then max_num_seqs;
        # above it (prefill chunks, mixed steps): steps of 2x
        small = tuple(sorted(decode)) or tuple(sorted(
            {4 ** i for i in range(12) if 4 ** i < max_num_seqs} | {max_num_seqs}))
        large = tuple(sorted(prefill)) or tuple(
            t for t in powers_of_two(1, top) if t > max_num_seqs)
        buckets = sorted(set(small) | set(large))
        if buckets[-1] < top:
            buckets.append(top)
        max_pages = -(-max_model_len // page_size)
        in_place = backend in IN_PLACE_BACKENDS
        if in_place:
            ctx = (max_pages,)
        else:
            # the reference's cost follows the bucketed context: steps of 2x
            pow2 = powers_of_two(1, max_pages)[-1]
            ctx = tuple(min(p, max_pages) for p in spaced_down(pow2, 2, min(4, pow2)))
            ctx = tuple(sorted(set(ctx)))
        return cls(token_buckets=tuple(buckets), max_num_seqs=max_num_seqs, ctx_pages=ctx,
                   page_size=page_size, in_place=in_place)

    def num_seqs(self, num_tokens: int) -> int:
        return min(num_tokens, self.max_num_seqs)

    def shape_for(self, num_tokens: int, num_seqs: int, context: int,
                  decode_only: bool) -> StepShape:
        """The bucket of a step with these real sizes.

        Raises:
          ValueError: it holds more than the largest bucket.
        """
        t = round_up(max(num_tokens, num_seqs, 1), self.token_buckets)
        while self.num_seqs(t) < num_seqs:  # e.g. --decode-buckets smaller than the rows
            t = round_up(t + 1, self.token_buckets)
        pages = round_up(max(-(-context // self.page_size), 1), self.ctx_pages)
        q = t if self.in_place or not decode_only else 1
        return StepShape(t, self.num_seqs(t), pages, q)

    def all_shapes(self) -> list[StepShape]:
        """Every shape the engine may run (what start-up compiles)."""
        shapes = []
        for t in self.token_buckets:
            for p in self.ctx_pages:
                shapes.append(StepShape(t, self.num_seqs(t), p, t))
                if not self.in_place and self.num_seqs(t) == t and t > 1:
                    shapes.append(StepShape(t, t, p, 1))  # decode-only (reference)
        return shapes
