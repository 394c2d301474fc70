"""Two real ranks (gloo, two processes): different local losses, one all_reduce per update, identical proportions."""

from __future__ import annotations

import pickle
import time
import warnings
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import ChaseLoss, Recorder

import odm
import odm.feedback
from odm.policies import Policy, get_policy, policy_names

K = 6
STEPS = 150
EVAL_EVERY = 10


def _learned_policy() -> Policy:
    """EXP3 once the policies land; until then the small learned test policy."""
    return get_policy("exp3") if "exp3" in policy_names() else ChaseLoss()


def _rank_main(rank: int, world: int, store: str, out_dir: str, path: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    if path == "device":  # the torch accumulation CUDA losses take, on CPU tensors
        odm.feedback._CPU_ON_HOST = False
    try:
        calls = []
        all_reduce = dist.all_reduce

        def counting_all_reduce(tensor, *args, **kwargs):  # type: ignore[no-untyped-def]
            calls.append(tuple(tensor.shape))
            return all_reduce(tensor, *args, **kwargs)

        dist.all_reduce = counting_all_reduce
        rec = Recorder(_learned_policy())
        mixer = odm.OnlineMixer([f"d{i}" for i in range(K)], rec, delay=1, seed=rank)
        rng = np.random.default_rng(100 + rank)
        local, local_eval, proportions = [], [], []
        for t in range(STEPS):
            # Two micro-batches per step (batches 2t and 2t+1, which may fall under different schedule rows);
            # each rank draws its own sizes, domains and losses, and rank 1 sometimes observes nothing at all.
            step_sums = np.zeros(K)
            for b in (2 * t, 2 * t + 1):
                n = int(rng.integers(1, 20)) if rank == 0 or t % 7 else 0
                ids = mixer.sample(n)
                losses = rng.gamma(2.0, 1.0 + rank, n) + 0.3 * ids
                if n:
                    losses[0] = np.nan if t % 29 == 3 else losses[0]
                    mixer.observe(torch.from_numpy(ids), torch.from_numpy(losses), mix_step=b)
                finite = np.isfinite(losses)
                step_sums += np.bincount(ids[finite], losses[finite], minlength=K)
            local.append(step_sums)
            if (t + 1) % EVAL_EVERY == 0:
                s, c = rng.gamma(3.0, 1.0, K) * (rank + 1), np.full(K, 4.0 * (rank + 1))
                mixer.observe_eval(s, c)
                local_eval.append((s, c))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                mixer.step()
            proportions.append(mixer.proportions.tobytes())
        with open(f"{out_dir}/rank{rank}.pkl", "wb") as f:
            pickle.dump(
                {
                    "local": local,
                    "local_eval": local_eval,
                    "p": proportions,
                    "loss_sum": [s.loss_sum for s in rec.seen],
                    "drawn": [s.proportions for s in rec.seen],
                    "eval": [s.eval_loss for s in rec.seen],
                    "collectives": calls,
                },
                f,
            )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("path", ["host", "device"])
def test_ranks_with_different_local_losses_end_with_bit_identical_proportions(tmp_path, path):
    mp.spawn(_rank_main, args=(2, str(tmp_path / "store"), str(tmp_path), path), nprocs=2, join=True)
    r0, r1 = (pickle.loads((tmp_path / f"rank{r}.pkl").read_bytes()) for r in range(2))
    assert r0["p"] == r1["p"], "proportions must agree bit for bit on every rank after every step"
    assert len(set(r0["p"])) > STEPS // 2, "the learned policy must actually move the proportions"
    # Every step had an observation on rank 0, so there is one update per step, fed the sum of both ranks.
    assert len(r0["loss_sum"]) == STEPS
    for t in range(STEPS):
        np.testing.assert_allclose(r0["loss_sum"][t], r0["local"][t] + r1["local"][t], rtol=1e-12)
        assert r0["loss_sum"][t].tobytes() == r1["loss_sum"][t].tobytes()
        assert r0["drawn"][t].tobytes() == r1["drawn"][t].tobytes()
    assert len(r0["collectives"]) == STEPS, "one all_reduce per update"
    assert all(len(shape) == 1 for shape in r0["collectives"]), "of one stacked (flat) tensor"
    evals = [e for e in r0["eval"] if e is not None]
    assert len(evals) == STEPS // EVAL_EVERY
    for e, (s0, c0), (s1, c1) in zip(evals, r0["local_eval"], r1["local_eval"]):
        np.testing.assert_allclose(e, (s0 + s1) / (c0 + c1), rtol=1e-12)


def _rank_resume_main(rank: int, world: int, store: str, out_dir: str) -> None:
    """Each rank feeds its own losses; a checkpoint between updates is taken on every rank and resumed."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:

        def make() -> odm.OnlineMixer:
            return odm.OnlineMixer([f"d{i}" for i in range(K)], _learned_policy(), update_every=3, seed=rank)

        def run(mixer: odm.OnlineMixer, steps: range) -> list[bytes]:
            out = []
            for t in steps:
                rng = np.random.default_rng(1000 * rank + t)  # this rank's data at step t, whatever ran before
                ids = rng.integers(0, K, 8 + 4 * rank)
                mixer.observe(ids, rng.gamma(2.0, 1.0 + rank, len(ids)) + 0.5 * ids, mix_step=t)
                mixer.step()
                out.append(mixer.proportions.tobytes())
            return out

        whole = run(make(), range(20))
        first = make()
        run(first, range(8))  # 8 steps: two losses of each rank are pending (update_every=3)
        state = first.state_dict()  # a collective between updates: every rank calls it
        saved = [state]
        dist.broadcast_object_list(saved, src=0)  # every rank resumes from rank 0's file, as after a restart
        second = make()
        second.load_state_dict(saved[0])
        rest = run(second, range(8, 20))
        with open(f"{out_dir}/resume{rank}.pkl", "wb") as f:
            pickle.dump({"whole": whole, "rest": rest, "pending": state["pending"]}, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_a_checkpoint_between_updates_under_ddp_resumes_every_rank_exactly(tmp_path):
    mp.spawn(_rank_resume_main, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (pickle.loads((tmp_path / f"resume{r}.pkl").read_bytes()) for r in range(2))
    assert r0["whole"] == r1["whole"] and len(set(r0["whole"])) > 3, "the policy learns, identically on both ranks"
    assert r0["pending"] == r1["pending"], "the saved pending statistics are the sum over the ranks"
    assert r0["rest"] == r0["whole"][8:] and r1["rest"] == r1["whole"][8:]


# -- the checkpoint protocol and rank agreement (2 gloo ranks, a short timeout so a hang fails fast) ------------

TIMEOUT = timedelta(seconds=20)


def _disagreeing(rank: int) -> dict[str, odm.OnlineMixer]:
    """Mixers whose settings differ between rank 0 and rank 1 in exactly one way each."""
    return {
        "domains": odm.OnlineMixer(["a", "b"] if rank == 0 else ["a", "c"]),
        "num_domains": odm.OnlineMixer(["a", "b", "c"][: 3 - rank]),
        "policy": odm.OnlineMixer(["a", "b"], "uniform" if rank == 0 else ChaseLoss()),
        "update_every": odm.OnlineMixer(["a", "b"], update_every=1 + rank),
        "delay": odm.OnlineMixer(["a", "b"], delay=2 * rank),
        "policy config": odm.OnlineMixer(["a", "b"], get_policy("exp3", gamma=0.1 * (1 + rank))),
    }


def _protocol_main(rank: int, world: int, store: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=TIMEOUT)
    out: dict[str, object] = {}
    try:
        # 1. Disagreements: a ValueError on every rank, naming the field and each rank's value.
        for field, mixer in _disagreeing(rank).items():
            mixer.observe([0], [1.0])
            t0 = time.monotonic()
            try:
                mixer.step()
                out[field] = None
            except ValueError as err:
                out[field] = (str(err), time.monotonic() - t0)
        # A loader's own field takes part too.
        extra = odm.OnlineMixer(["a", "b"])
        extra.agreement_fields.update({"batch_size": 8 + rank})
        try:
            extra.check_agreement()
            out["batch_size"] = None
        except ValueError as err:
            out["batch_size"] = (str(err), 0.0)

        # 2. One all_reduce per step(), payloads gathered in it, rank-0-only state_dict() resumes both ranks.
        calls: list[tuple[int, ...]] = []
        all_reduce = dist.all_reduce

        def counting_all_reduce(tensor, *args, **kwargs):  # type: ignore[no-untyped-def]
            calls.append(tuple(tensor.shape))
            return all_reduce(tensor, *args, **kwargs)

        def make() -> odm.OnlineMixer:
            mixer = odm.OnlineMixer([f"d{i}" for i in range(K)], ChaseLoss(), update_every=3, seed=rank)
            mixer.register_payload("rows", lambda cut: np.array([rank, cut, 7.0]), 3)
            return mixer

        def run(mixer: odm.OnlineMixer, steps: range) -> list[bytes]:
            got = []
            for t in steps:
                rng = np.random.default_rng(1000 * rank + t)
                ids = rng.integers(0, K, 8 + 4 * rank)
                mixer.observe(ids, rng.gamma(2.0, 1.0 + rank, len(ids)) + 0.5 * ids, mix_step=t)
                mixer.step()
                got.append(mixer.proportions.tobytes())
            return got

        # 3. process_group: statistics are reduced over that group only (here each rank is its own group).
        groups = [dist.new_group([0]), dist.new_group([1])]
        rec = Recorder()
        solo = odm.OnlineMixer(["a", "b"], rec, process_group=groups[rank])
        solo.observe([rank], [1.0 + rank], mix_step=0)
        solo.step()
        out["solo_counts"] = rec.seen[0].count.tolist()

        whole = run(make(), range(20))
        first = make()
        dist.all_reduce = counting_all_reduce
        run(first, range(8))  # 8 steps: the statistics of steps 7 and 8 are pending (update_every=3)
        dist.all_reduce = all_reduce
        out["collectives"] = calls
        out["gathered"] = first.gathered("rows").tolist()
        out["cut"] = first.cut_batch
        if rank == 0:
            t0 = time.monotonic()
            torch.save(first.state_dict(), f"{out_dir}/ckpt.pt")  # rank 0 alone: must not wait for rank 1
            out["state_seconds"] = time.monotonic() - t0
        dist.barrier()
        second = make()
        second.load_state_dict(torch.load(f"{out_dir}/ckpt.pt", weights_only=True))
        out["whole"], out["rest"] = whole, run(second, range(8, 20))
    finally:
        with open(f"{out_dir}/protocol{rank}.pkl", "wb") as f:
            pickle.dump(out, f)
        dist.destroy_process_group()


def test_ranks_that_disagree_fail_fast_and_a_rank_0_checkpoint_resumes_every_rank(tmp_path):
    mp.spawn(_protocol_main, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (pickle.loads((tmp_path / f"protocol{r}.pkl").read_bytes()) for r in range(2))
    expected = {
        "domains": "`domains` differs (rank 0: ['a', 'b']; rank 1: ['a', 'c'])",
        "num_domains": "`num_domains` differs (rank 0: 3; rank 1: 2)",
        "policy": "`policy` differs (rank 0: 'odm.policies.static.Uniform({})'; rank 1: 'conftest.ChaseLoss({})')",
        "update_every": "`update_every` differs (rank 0: 1; rank 1: 2)",
        "delay": "`delay` differs (rank 0: 0; rank 1: 2)",
        "batch_size": "`batch_size` differs (rank 0: 8; rank 1: 9)",
        "policy config": "'gamma': 0.1, 'loss_smoothing'",
    }
    assert "'gamma': 0.2, 'loss_smoothing'" in r0["policy config"][0]
    for field, words in expected.items():
        for r in (r0, r1):
            assert r[field] is not None, f"ranks with a different {field} were accepted"
            message, seconds = r[field]
            assert words in message and "ranks disagree" in message, message
            assert seconds < 10
    # Exactly one all_reduce per step(), and the payload travelled in it.
    assert r0["collectives"] == r1["collectives"] == [(odm.feedback.FeedbackRows.size(K) + 2 * 5,)] * 8
    assert r0["gathered"] == r1["gathered"] == [[0.0, 7.0, 7.0], [1.0, 7.0, 7.0]]
    assert r0["cut"] == r1["cut"] == 7
    assert r0["state_seconds"] < 5
    for r in (r0, r1):
        assert r["rest"] == r["whole"][8:], "rank 0's checkpoint resumes this rank exactly"
    assert r0["whole"] == r1["whole"]
    assert (r0["solo_counts"], r1["solo_counts"]) == ([1.0, 0.0], [0.0, 1.0]), "reduced over its own group only"


def _foreign_row_main(rank: int, world: int, store: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=TIMEOUT)
    try:
        mixer = odm.OnlineMixer(["a", "b"], "exp3")
        mixer.observe([0, 1], [1.0, 2.0], mix_step=0)
        mixer.step()
        mixer.observe([0, 1], [1.0, 2.0], mix_step=1)
        if rank == 0:
            mixer.schedule.publish([0.9, 0.1], effective_from=5)  # behind the mixer's back, on one rank only
        t0 = time.monotonic()
        try:
            mixer.step()
            out: object = None
        except (RuntimeError, ValueError) as err:
            out = (type(err).__name__, str(err), time.monotonic() - t0, mixer.num_steps)
        with open(f"{out_dir}/foreign{rank}.pkl", "wb") as f:
            pickle.dump(out, f)
    finally:
        dist.destroy_process_group()


def test_a_row_published_behind_one_ranks_mixer_fails_the_step_on_every_rank_without_a_hang(tmp_path):
    mp.spawn(_foreign_row_main, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (pickle.loads((tmp_path / f"foreign{r}.pkl").read_bytes()) for r in range(2))
    assert r0 is not None and r1 is not None, "a rank stepped on although another could not"
    assert r0[0] == "RuntimeError" and "something else published to it" in r0[1]
    assert r1[0] == "ValueError" and "rank(s) [0] failed this step" in r1[1]
    assert r0[2] < 10 and r1[2] < 10  # after the one collective, not after a timeout
    assert r0[3] == r1[3] == 1  # the failed step changed nothing
