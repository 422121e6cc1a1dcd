"""Scheduler: budgets, chunked prefill, decode batching, preemption, forks, stress.

A fake runner plays the model: it writes (token, position) into a host-side
"KV cache" at each scheduled slot, checks that every slot the step attends to
holds the right token (so wrong sharing, eviction or page reuse shows up), and
samples a token that is a deterministic function of the context and the
sequence index. Results are compared with plain generation without paging.
"""

import random

import pytest

from serving.engine.block_manager import BlockManager
from serving.engine.scheduler import ScheduledSeq, Scheduler, SchedulerConfig, SchedulerOutput
from serving.engine.sequence import SequenceGroup, SequenceStatus
from serving.engine.types import FinishReason, SamplingParams

PS = 4


def next_token(context, index):
    """The fake model: deterministic in the context and the completion index."""
    h = len(context) * 1000003 + index * 7919
    for t in context[-6:]:
        h = (h * 31 + t) % 1_000_000_007
    return h % 997


def reference(prompt, max_tokens, index=0):
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(next_token(tokens, index))
    return tokens[len(prompt):]


class FakeRunner:
    """Writes and reads a host-side paged KV cache as the real runner would."""

    def __init__(self, bm):
        self.bm = bm
        self.kv = {}  # flat slot -> (token, position)

    def step(self, out):
        ps, sampled = self.bm.page_size, {}
        for item in out.scheduled:
            seq = item.seq
            assert item.end <= seq.num_tokens
            assert len(seq.block_table) * ps >= item.end
            for pos in range(item.start, item.end):
                page = seq.block_table[pos // ps]
                assert page != 0, "scratch page used"
                self.kv[page * ps + pos % ps] = (seq.all_token_ids[pos], pos)
            for pos in range(item.end):  # attention reads the whole context
                slot = seq.block_table[pos // ps] * ps + pos % ps
                assert self.kv.get(slot) == (seq.all_token_ids[pos], pos), (seq, pos)
            if item.samples:
                sampled[seq.seq_id] = next_token(seq.all_token_ids, seq.index)
        return sampled


def make(num_pages=64, prefix=True, **cfg):
    cfg.setdefault("max_model_len", 64)
    bm = BlockManager(num_pages, PS, enable_prefix_caching=prefix)
    return Scheduler(SchedulerConfig(**cfg), bm), FakeRunner(bm)


def group(rid, prompt, max_tokens=4, **params):
    return SequenceGroup(rid, list(prompt), SamplingParams(max_tokens=max_tokens, **params))


def step(sched, runner):
    """One engine step: schedule, run, postprocess, stop on max_tokens."""
    out = sched.schedule()
    newly = sched.postprocess(out, runner.step(out))
    for seq in newly:
        if seq.params.max_tokens is not None and seq.num_output_tokens >= seq.params.max_tokens:
            sched.finish(seq, FinishReason.LENGTH)
    sched.block_manager.check_invariants([*sched.running, *sched.waiting])
    return out


def run_all(sched, runner, max_steps=1000):
    for _ in range(max_steps):
        if not sched.has_unfinished():
            return
        step(sched, runner)
    raise AssertionError("did not finish")


def counts(out):
    return [(s.seq.request_id, s.num_new_tokens) for s in out.scheduled]


def test_config_validation():
    with pytest.raises(ValueError):
        SchedulerConfig(max_model_len=0)
    with pytest.raises(ValueError):
        SchedulerConfig(max_model_len=4096, max_num_batched_tokens=2048, enable_chunked_prefill=False)
    with pytest.raises(ValueError):
        SchedulerConfig(max_model_len=64, long_prefill_token_threshold=0)
    with pytest.raises(ValueError):  # max_model_len does not fit the KV cache
        Scheduler(SchedulerConfig(max_model_len=64), BlockManager(8, PS))


def test_add_rejects_long_prompt_and_duplicate_id():
    sched, _ = make(max_model_len=16)
    with pytest.raises(ValueError):
        sched.add(group("a", range(17)))
    sched.add(group("a", range(16)))
    with pytest.raises(ValueError):
        sched.add(group("a", range(3)))


def test_token_budget_chunks_the_last_admitted_prompt():
    sched, runner = make(max_num_batched_tokens=10)
    for rid in "abc":
        sched.add(group(rid, range(4)))
    out = step(sched, runner)
    assert counts(out) == [("a", 4), ("b", 4), ("c", 2)]
    assert out.num_batched_tokens == 10 and out.num_prefill_tokens == 10
    out = step(sched, runner)  # a, b decode; c finishes its prompt
    assert counts(out) == [("a", 1), ("b", 1), ("c", 2)]
    assert out.num_decode_seqs == 2


def test_without_chunking_a_prompt_waits_for_budget():
    sched, runner = make(max_num_batched_tokens=64, enable_chunked_prefill=False)
    sched.add(group("a", range(40)))
    sched.add(group("b", range(100, 140)))
    assert counts(step(sched, runner)) == [("a", 40)]
    assert counts(step(sched, runner)) == [("a", 1), ("b", 40)]


def test_max_num_seqs():
    sched, runner = make(max_num_seqs=2)
    for rid in "abc":
        sched.add(group(rid, range(3), max_tokens=2))
    assert counts(step(sched, runner)) == [("a", 3), ("b", 3)]
    assert sched.num_running == 2 and sched.num_waiting == 1
    assert counts(step(sched, runner)) == [("a", 1), ("b", 1)]  # both finish here
    assert counts(step(sched, runner)) == [("c", 3)]


def test_page_limit_delays_admission():
    sched, runner = make(num_pages=17, max_model_len=64)  # 16 usable pages
    sched.add(group("a", range(40), max_tokens=2))  # 10 pages, 11 after one token
    sched.add(group("b", range(100, 130), max_tokens=2))  # 8 pages: does not fit beside a
    assert counts(step(sched, runner)) == [("a", 40)]
    assert counts(step(sched, runner)) == [("a", 1)]  # a finishes, frees its pages
    assert counts(step(sched, runner)) == [("b", 30)]


def test_chunked_prefill_of_long_prompt():
    sched, runner = make(max_num_batched_tokens=10)
    prompt = list(range(100, 125))
    sched.add(group("a", prompt, max_tokens=3))
    sizes = []
    while sched.has_unfinished():
        out = step(sched, runner)
        sizes.append(out.scheduled[0].num_new_tokens)
        if len(sizes) < 3:
            assert not out.scheduled[0].samples
    assert sizes == [10, 10, 5, 1, 1]


def test_long_prefill_token_threshold():
    sched, runner = make(max_num_batched_tokens=16, long_prefill_token_threshold=6)
    sched.add(group("a", range(20)))
    sched.add(group("b", range(3)))
    assert counts(step(sched, runner)) == [("a", 6), ("b", 3)]
    assert counts(step(sched, runner)) == [("a", 6), ("b", 1)]


def test_requests_join_mid_flight_and_outputs_match_reference():
    sched, runner = make(max_num_batched_tokens=12)
    a, b = group("a", range(5), max_tokens=6), group("b", range(50, 59), max_tokens=3)
    sched.add(a)
    step(sched, runner)
    step(sched, runner)
    sched.add(b)
    out = step(sched, runner)
    assert counts(out) == [("a", 1), ("b", 9)]
    assert out.num_decode_seqs == 1 and out.num_prefill_tokens == 9
    run_all(sched, runner)
    assert a.seqs[0].output_token_ids == reference(range(5), 6)
    assert b.seqs[0].output_token_ids == reference(range(50, 59), 3)
    assert a.seqs[0].finish_reason == FinishReason.LENGTH


def test_preemption_and_resume():
    sched, runner = make(num_pages=9, max_model_len=32)  # 8 usable pages
    a, b = group("a", range(14), max_tokens=12), group("b", range(20, 34), max_tokens=12)
    sched.add(a)
    sched.add(b)
    preempted = None
    for _ in range(40):
        out = step(sched, runner)
        if out.preempted:
            preempted = out
            break
    assert preempted is not None
    victim = preempted.preempted[0]
    assert victim is b.seqs[0]  # the most recently admitted
    assert victim.status == SequenceStatus.WAITING and sched.waiting[0] is victim
    assert victim.num_computed_tokens == 0 and victim.block_table == []
    assert victim.num_output_tokens > 0 and victim.num_preemptions == 1
    assert [s.seq for s in preempted.scheduled] == [a.seqs[0]]
    run_all(sched, runner)
    assert a.seqs[0].output_token_ids == reference(range(14), 12)
    assert b.seqs[0].output_token_ids == reference(range(20, 34), 12)
    assert sched.block_manager.num_free_pages == 8


def test_sequence_preempts_itself_when_alone_last():
    sched, runner = make(num_pages=9, max_model_len=32)
    a, b = group("a", range(15), max_tokens=16), group("b", range(40, 55), max_tokens=16)
    sched.add(a)
    sched.add(b)
    run_all(sched, runner)
    assert a.seqs[0].output_token_ids == reference(range(15), 16)
    assert b.seqs[0].output_token_ids == reference(range(40, 55), 16)


def test_abort_waiting_and_running_frees_pages_at_once():
    sched, runner = make(num_pages=17, max_num_seqs=1)
    sched.add(group("a", range(10)))
    sched.add(group("b", range(10)))
    step(sched, runner)
    bm = sched.block_manager
    assert bm.num_used_pages == 3
    aborted = sched.abort("a")
    assert [s.finish_reason for s in aborted] == [FinishReason.ABORT]
    assert bm.num_used_pages == 0 and sched.num_running == 0
    assert sched.abort("b")[0].status == SequenceStatus.FINISHED
    assert not sched.has_unfinished() and sched.abort("b") == []
    assert sched.get_group("a") is None
    bm.check_invariants([])


def test_abort_during_step_is_skipped_by_postprocess():
    sched, runner = make()
    sched.add(group("a", range(6)))
    out = sched.schedule()
    sampled = runner.step(out)
    sched.abort("a")
    assert sched.postprocess(out, sampled) == []
    assert sched.block_manager.num_used_pages == 0


def test_best_of_forks_share_prompt_pages():
    sched, runner = make(prefix=False)
    g = group("a", range(10), max_tokens=5, n=3)
    sched.add(g)
    out = step(sched, runner)
    assert [s.seq for s in out.scheduled] == [g.seqs[0]]
    out = step(sched, runner)  # children fork: only the 2-token tail is computed
    children = [s for s in out.scheduled if s.seq is not g.seqs[0]]
    assert [(s.seq.index, s.start, s.num_new_tokens) for s in children] == [(1, 8, 2), (2, 8, 2)]
    bm = sched.block_manager
    shared = g.seqs[0].block_table[:2]
    assert all(s.block_table[:2] == shared for s in g.seqs)
    assert [bm.refcount(p) for p in shared] == [3, 3]
    run_all(sched, runner)
    for s in g.seqs:
        assert s.output_token_ids == reference(range(10), 5, index=s.index)
    assert len({tuple(s.output_token_ids) for s in g.seqs}) == 3
    assert bm.num_free_pages == bm.num_usable_pages


def test_prefix_cache_hit_for_second_request():
    sched, runner = make()
    system = list(range(200, 216))  # 4 full pages
    a = group("a", system + [1, 2, 3], max_tokens=2)
    sched.add(a)
    run_all(sched, runner)
    b = group("b", system + [7, 8], max_tokens=2)
    sched.add(b)
    out = step(sched, runner)
    assert (out.scheduled[0].start, out.scheduled[0].num_new_tokens) == (16, 2)
    assert b.seqs[0].num_cached_tokens == 16
    run_all(sched, runner)
    assert b.seqs[0].output_token_ids == reference(system + [7, 8], 2)
    # prompt logprobs disable the lookup
    c = group("c", system + [9], max_tokens=1, prompt_logprobs=1)
    sched.add(c)
    assert step(sched, runner).scheduled[0].num_new_tokens == 17
    assert c.seqs[0].num_cached_tokens == 0


def test_flush_refused_while_running():
    sched, runner = make()
    sched.add(group("a", range(9), max_tokens=3))
    step(sched, runner)
    assert not sched.flush_prefix_cache()
    run_all(sched, runner)
    assert sched.block_manager.num_cached_pages > 0
    assert sched.flush_prefix_cache()
    assert sched.block_manager.num_cached_pages == 0


def test_overlong_sequence_is_finished_by_the_scheduler():
    sched, runner = make(max_model_len=8)
    g = group("a", range(8), max_tokens=None)
    sched.add(g)
    step(sched, runner)  # prefill samples token 9: 9 tokens > max_model_len
    assert g.seqs[0].num_tokens == 9
    out = sched.schedule()  # the engine did not finish it; the scheduler does
    assert out.is_empty and out.finished == [g.seqs[0]]
    assert g.seqs[0].finish_reason == FinishReason.LENGTH
    assert not sched.has_unfinished()


def test_scheduled_seq_properties():
    sched, _ = make()
    g = group("a", range(5))
    sched.add(g)
    out = sched.schedule()
    item = out.scheduled[0]
    assert isinstance(out, SchedulerOutput) and isinstance(item, ScheduledSeq)
    assert (item.start, item.end, item.samples, item.is_prefill) == (0, 5, True, True)


@pytest.mark.parametrize("seed", range(4))
def test_stress(seed):
    rng = random.Random(seed)
    sched, runner = make(num_pages=rng.choice([17, 20, 33]), prefix=rng.random() < 0.8,
                         max_model_len=64, max_num_seqs=rng.choice([4, 8, 16]),
                         max_num_batched_tokens=rng.choice([16, 32, 64]),
                         long_prefill_token_threshold=rng.choice([None, 8]))
    bm = sched.block_manager
    systems = [[rng.randrange(997) for _ in range(rng.randrange(4, 20))] for _ in range(3)]
    groups, aborted, num_preempted, next_id = [], set(), 0, 0
    for step_no in range(3000):
        if next_id < 40 and rng.random() < 0.3:
            prompt = rng.choice(systems)[:] if rng.random() < 0.6 else []
            prompt += [rng.randrange(997) for _ in range(rng.randrange(1, 20))]
            n = rng.choice([1, 1, 1, 2, 3])
            g = group(f"r{next_id}", prompt[:40], max_tokens=rng.randrange(1, 24), n=n)
            sched.add(g)
            groups.append(g)
            next_id += 1
        if groups and rng.random() < 0.03:
            g = rng.choice(groups)
            if sched.abort(g.request_id):
                aborted.add(g.request_id)
            bm.check_invariants([*sched.running, *sched.waiting])
        if not sched.has_unfinished():
            if next_id >= 40:
                break
            continue
        out = step(sched, runner)
        num_preempted += len(out.preempted)
        assert out.num_batched_tokens <= sched.config.max_num_batched_tokens
        assert sched.num_running <= sched.config.max_num_seqs
        ids = [s.seq.seq_id for s in out.scheduled]
        assert len(ids) == len(set(ids))
    assert not sched.has_unfinished()
    assert next_id == 40
    for g in groups:
        if g.request_id in aborted:
            continue
        for s in g.seqs:
            assert s.finish_reason == FinishReason.LENGTH
            assert s.output_token_ids == reference(s.prompt_token_ids, s.params.max_tokens, s.index)
    assert bm.num_free_pages == bm.num_usable_pages == bm.num_pages - 1
    assert all(bm.refcount(p) == 0 for p in range(bm.num_pages))
    bm.check_invariants([])
    assert num_preempted > 0 and aborted
    hits = sum(s.num_cached_tokens for g in groups for s in g.seqs)
    assert hits > 0 or not bm.enable_prefix_caching
    assert any(len(g.seqs) > 1 and g.request_id not in aborted for g in groups)
