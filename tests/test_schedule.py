import numpy as np
import pytest
import torch

from odm.schedule import MODE_EXACT, ProportionSchedule


def test_lookup_returns_the_newest_row_in_force_at_each_batch():
    s = ProportionSchedule(3)
    s.publish([1, 0, 0], effective_from=5)
    s.publish([0, 1, 0], effective_from=8)
    s.publish([0, 0, 1], effective_from=8)  # same batch: the newer row wins
    assert np.allclose(s.lookup(0)[0], 1 / 3)
    assert np.allclose(s.lookup(4)[0], 1 / 3)
    assert s.lookup(5)[0].tolist() == [1, 0, 0]
    assert s.lookup(7)[0].tolist() == [1, 0, 0]
    assert s.lookup(8)[0].tolist() == [0, 0, 1]
    assert s.lookup(10**9)[0].tolist() == [0, 0, 1]


def test_published_proportions_are_normalised_and_carry_their_mode():
    s = ProportionSchedule(2)
    s.publish([1, 3], effective_from=1, mode=MODE_EXACT)
    p, mode, _ = s.lookup(1)
    assert p.tolist() == [0.25, 0.75]
    assert mode == MODE_EXACT


@pytest.mark.parametrize(
    "bad, match",
    [([-1, 2], "non-negative"), ([np.nan, 1], "finite"), ([0, 0], "all zero"), ([1, 1, 1], "one entry per domain")],
)
def test_invalid_proportions_are_refused_with_the_reason(bad, match):
    s = ProportionSchedule(2)
    with pytest.raises(ValueError, match=match):
        s.publish(bad, effective_from=1)


def test_rows_must_be_published_in_batch_order():
    s = ProportionSchedule(2)
    s.publish([1, 1], effective_from=10)
    with pytest.raises(ValueError, match="earlier than the newest"):
        s.publish([1, 1], effective_from=9)


def test_a_row_that_left_the_ring_is_an_error_not_a_wrong_answer():
    s = ProportionSchedule(2, capacity=4)
    for b in range(1, 10):
        s.publish([1, b], effective_from=b)
    assert s.lookup(9)[0].tolist() == pytest.approx([0.1, 0.9])
    with pytest.raises(RuntimeError, match="left the schedule ring"):
        s.lookup(2)


def test_state_round_trip_restores_future_rows():
    s = ProportionSchedule(2)
    s.publish([1, 3], effective_from=4)
    s.publish([3, 1], effective_from=9)
    t = ProportionSchedule(2)
    t.load_state_dict(s.state_dict())
    for b in range(12):
        assert t.lookup(b)[0].tolist() == s.lookup(b)[0].tolist()
    with pytest.raises(ValueError, match="for 2 domains, this schedule has 3"):
        ProportionSchedule(3).load_state_dict(s.state_dict())


def _child_reads(schedule, ready, done, out):
    ready.set()
    done.wait(30)
    out.put(schedule.lookup(100)[0].tolist())


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_rows_published_after_a_process_starts_reach_it(start_method):
    ctx = torch.multiprocessing.get_context(start_method)
    s = ProportionSchedule(2)
    ready, done, out = ctx.Event(), ctx.Event(), ctx.Queue()
    proc = ctx.Process(target=_child_reads, args=(s, ready, done, out))
    proc.start()
    assert ready.wait(60)
    s.publish([1, 4], effective_from=50)  # published after the child holds its copy
    done.set()
    got = out.get(timeout=60)
    proc.join(30)
    assert got == pytest.approx([0.2, 0.8])


def test_schedule_rejects_bad_construction_arguments():
    with pytest.raises(ValueError, match="num_domains"):
        ProportionSchedule(0)
    with pytest.raises(ValueError, match="capacity"):
        ProportionSchedule(2, capacity=1)
    with pytest.raises(ValueError, match=r"`effective_from` must be an integer >= 0, got -1"):
        ProportionSchedule(2).publish([1, 1], effective_from=-1)


def test_state_round_trip_keeps_every_row_bit_for_bit():
    rng = np.random.default_rng(0)
    s = ProportionSchedule(5, capacity=512)
    for b in range(1, 300):
        s.publish(rng.dirichlet(np.ones(5)) * rng.uniform(0.1, 10), effective_from=b)
    t = ProportionSchedule(5, capacity=512)
    t.load_state_dict(s.state_dict())
    assert [(e, m, p.tobytes()) for p, m, e in t.rows()] == [(e, m, p.tobytes()) for p, m, e in s.rows()]


def test_lookup_names_the_position_of_the_row_in_force_so_readers_can_reuse_the_newest():
    s = ProportionSchedule(2, capacity=4)
    for b in (5, 9, 9, 20):  # rows 1..4; row 0 (batch 0) leaves the ring
        s.publish([b, 1], effective_from=b)
    assert [s.lookup(b).position for b in (5, 8, 9, 19, 20, 10**6)] == [1, 1, 3, 3, 4, 4]
    assert s.lookup(20).position == s.num_rows - 1
    p, mode, position = s.lookup(7)  # unpacks in this order
    assert (p.tolist(), mode, position) == ([5 / 6, 1 / 6], 0, 1)


def test_proportions_for_is_lookup_without_the_copy_at_every_batch_and_cannot_be_written():
    rng = np.random.default_rng(0)
    s = ProportionSchedule(4, capacity=8)
    effective = 0
    for _ in range(20):  # wraps the ring: old rows are evicted, the newest are ahead of some batches
        effective += int(rng.integers(0, 3))
        s.publish(rng.random(4) + 0.01, effective_from=effective)
        oldest = s.oldest_batch()
        for b in range(oldest, effective + 3):
            view = s.proportions_for(b)
            assert view.tolist() == s.lookup(b).proportions.tolist()
            assert not view.flags.writeable
    with pytest.raises(RuntimeError, match="left the schedule ring"):
        s.proportions_for(s.oldest_batch() - 1)
