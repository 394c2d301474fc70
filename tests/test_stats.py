"""Per-domain statistics: ``DomainLoss`` and ``evaluate_domains`` against slow references."""

from __future__ import annotations

import os
import socket
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from odm.stats import DomainLoss, evaluate_domains

DOMAINS = ["web", "code", "math"]


def reference_means(ids: list[np.ndarray], losses: list[np.ndarray], k: int) -> np.ndarray:
    """Slow and obvious: per-domain mean over every finite sample, NaN for a domain never seen."""
    out = []
    for d in range(k):
        vals = [float(v) for i, vs in zip(ids, losses) for a, v in zip(i, vs) if a == d and np.isfinite(v)]
        out.append(sum(vals) / len(vals) if vals else float("nan"))
    return np.array(out)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_domain_loss_matches_a_per_sample_reference_over_many_batches(seed):
    rng = np.random.default_rng(seed)
    metric = DomainLoss(DOMAINS)
    ids, losses = [], []
    for _ in range(5):
        n = int(rng.integers(1, 20))
        i = rng.integers(0, 2, n)  # `math` never drawn
        v = rng.exponential(size=n)
        v[rng.random(n) < 0.1] = np.inf
        ids.append(i)
        losses.append(v)
        metric.update(torch.from_numpy(i), torch.from_numpy(v).float())
    got = metric.compute().numpy()
    want = reference_means(ids, losses, 3)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert np.isnan(got[2])
    assert set(metric.as_dict()) == {"web", "code"}
    metric.reset()
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert np.isnan(metric.compute().numpy()).all()


def test_domain_loss_weights_and_one_domain_scalar_losses():
    metric = DomainLoss(DOMAINS)
    metric.update(torch.tensor([0, 1]), torch.tensor([2.0, 4.0]), weight=torch.tensor([3.0, 1.0]))
    metric.update(torch.tensor([2, 2, 2, 2]), torch.tensor(5.0))  # a scalar counts once per sample
    metric.update(torch.tensor([0]), torch.tensor([6.0]))
    assert metric.count.tolist() == [4.0, 1.0, 4.0]
    assert metric.compute().tolist() == pytest.approx([(3 * 2 + 6) / 4, 4.0, 5.0])


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ((torch.tensor([0, 3]), torch.tensor([1.0, 1.0])), ValueError, r"\[0, 2\]"),
        ((torch.tensor([0, 1]), torch.tensor([1.0])), ValueError, "2 ids"),
        ((torch.tensor([0]), torch.tensor([1.0]), torch.tensor([1.0, 2.0])), ValueError, "weight"),
    ],
)
def test_domain_loss_rejects_bad_updates(args, error, match):
    with pytest.raises(error, match=match):
        DomainLoss(DOMAINS).update(*args)


@pytest.mark.parametrize(("domains", "error"), [([], ValueError), ("web", TypeError), (["a", "a"], ValueError)])
def test_domain_loss_rejects_bad_domain_lists(domains, error):
    with pytest.raises(error):
        DomainLoss(domains)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _sync_worker(rank: int, port: int, queue: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        metric = DomainLoss(DOMAINS)
        if rank == 0:
            metric.update(torch.tensor([0, 0, 1]), torch.tensor([1.0, 3.0, 10.0]))
        else:
            metric.update(torch.tensor([0, 2]), torch.tensor([5.0, 7.0]))
        queue.put((rank, metric.compute().tolist()))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_domain_loss_sums_then_divides_across_ranks():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_sync_worker, args=(r, port, queue)) for r in (0, 1)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    # web: (1 + 3 + 5) / 3 — the mean over all samples, not the mean of the ranks' means.
    assert results[0] == results[1] == pytest.approx([3.0, 10.0, 7.0])


class Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 1)
        self.drop = torch.nn.Dropout(0.5)

    def losses(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return (self.drop(self.lin(x)).squeeze(-1) - y).pow(2)


def held_out(seed: int = 0) -> dict[str, torch.utils.data.DataLoader]:
    g = torch.Generator().manual_seed(seed)
    sizes = {"web": 37, "code": 16}
    return {
        d: torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(torch.randn(n, 4, generator=g), torch.randn(n, generator=g)), batch_size=8
        )
        for d, n in sizes.items()
    }


def test_evaluate_domains_matches_a_reference_loop_and_leaves_missing_domains_at_zero():
    model = Model().eval()
    loaders = held_out()
    loss_sum, count = evaluate_domains(model.losses, loaders, domains=DOMAINS)
    assert loss_sum.dtype == count.dtype == torch.float64
    with torch.no_grad():
        want = [sum(float(v) for b in loaders[d] for v in model.losses(b)) if d in loaders else 0.0 for d in DOMAINS]
    np.testing.assert_allclose(loss_sum.numpy(), want, rtol=1e-6)
    assert count.tolist() == [37.0, 16.0, 0.0]


def test_evaluate_domains_runs_without_grad_reads_at_most_max_batches_and_moves_batches():
    seen: list[tuple[bool, str]] = []
    model = Model().eval()

    def loss_fn(batch: Any) -> torch.Tensor:
        seen.append((torch.is_grad_enabled(), batch[0].device.type))
        return model.losses(batch)

    _, count = evaluate_domains(loss_fn, held_out(), device="cpu", max_batches=2)
    assert count.tolist() == [16.0, 16.0]
    assert seen == [(False, "cpu")] * 4


def test_evaluate_domains_counts_a_scalar_loss_once_per_sample():
    loaders = {"web": [torch.ones(3, 2), torch.ones(5, 2)]}
    loss_sum, count = evaluate_domains(lambda b: b.sum(-1).mean(), loaders, domains=DOMAINS)
    assert count.tolist() == [8.0, 0.0, 0.0]
    assert loss_sum.tolist() == [16.0, 0.0, 0.0]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"loaders": {"wiki": []}, "domains": DOMAINS}, ValueError, "unknown domains"),
        ({"loaders": [[]]}, TypeError, "mapping"),
        ({"loaders": {"web": []}, "max_batches": 0}, ValueError, "max_batches"),
        ({"loaders": {"web": [torch.ones(2, 2)]}}, ValueError, r"shape \[B\]"),
        ({"loaders": {"web": [torch.ones(2)]}, "loss_fn": lambda b: 1.0}, TypeError, "tensor"),
    ],
)
def test_evaluate_domains_rejects_bad_input_with_a_clear_message(kwargs, error, match):
    loss_fn = kwargs.pop("loss_fn", lambda b: b)
    with pytest.raises(error, match=match):
        evaluate_domains(loss_fn, **kwargs)


def test_evaluate_domains_credits_each_loader_to_the_domain_it_is_keyed_by_whatever_the_dict_order():
    loaders = {"math": [torch.full((2,), 3.0)], "web": [torch.full((4,), 1.0)]}  # not in DOMAINS order
    loss_sum, count = evaluate_domains(lambda b: b, loaders, domains=DOMAINS)
    assert loss_sum.tolist() == [4.0, 0.0, 6.0]
    assert count.tolist() == [4.0, 0.0, 2.0]


def test_import_odm_is_light_and_gives_odm_stats_on_first_use():
    import subprocess
    import sys

    code = (
        "import sys, odm\n"
        "heavy = ('torchmetrics', 'lightning', 'transformers', 'matplotlib', 'odm.stats')\n"
        "assert not [m for m in heavy if m in sys.modules], [m for m in heavy if m in sys.modules]\n"
        "import torch\n"
        "loss_sum, count = odm.stats.evaluate_domains(lambda b: b, {'b': [torch.ones(2)]}, domains=['a', 'b'])\n"
        "assert count.tolist() == [0.0, 2.0]\n"
        "assert 'torchmetrics' not in sys.modules, 'evaluate_domains needs only torch'\n"
        "assert odm.stats.DomainLoss.__name__ == 'DomainLoss'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
