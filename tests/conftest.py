"""Shared test helpers."""

from __future__ import annotations

import io
import os
import socket
from collections.abc import Callable
from typing import Any

import pytest
import torch


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a gloo rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def count_row(row: Any, path: str) -> Any:
    """A ``.map`` function that counts the rows a dataset yields: one byte appended to ``path`` per row (works
    across DataLoader worker processes). Read the count with :func:`rows_counted`."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, b".")
    finally:
        os.close(fd)
    return row


def rows_counted(path: Any) -> int:
    """The rows :func:`count_row` counted in ``path`` (0 before any)."""
    return os.path.getsize(path) if os.path.exists(path) else 0


def resume_in_place(
    loader: Any, run: Callable[..., Any], cut: int, after: int, before_resume: Callable[[], Any]
) -> Any:
    """Checkpoints ``loader`` after ``cut`` batches, takes ``after`` more, ends the epoch (persistent workers stay),
    loads the checkpoint into the same loader, calls ``before_resume()`` and takes ``after`` again.

    ``run(loader, n, it=None) -> (batches, iterator)`` takes and steps on ``n`` batches.
    Returns ``(state, expected, got)``.
    """
    _, it = run(loader, cut)
    state = loader.state_dict()
    expected, it = run(loader, after, it)
    for _ in it:  # the epoch ends
        pass
    del it
    loader.load_state_dict(state)
    before_resume()
    got, it = run(loader, after)
    del it  # (with workers: they stop prefetching)
    return state, expected, got


def resume_from_rank_zeros_file(
    make: Callable[[], Any], run: Callable[..., Any], cut: int, after: int, path: str, before_resume: Callable[[], Any]
) -> Any:
    """Inside a running process group: every rank takes ``cut`` batches, rank 0 alone saves its loader's state to
    ``path`` (``state_dict()`` is local), every rank takes ``after`` more; then a fresh ``make()`` on every rank
    loads that one file, ``before_resume()`` runs and it takes ``after`` again.

    Returns ``(state, expected, got)`` of this rank.
    """
    first = make()
    _, it = run(first, cut)
    if torch.distributed.get_rank() == 0:
        torch.save(first.state_dict(), path)
    expected, _ = run(first, after, it)
    torch.distributed.barrier()
    resumed = make()
    state = torch.load(path, weights_only=True)
    resumed.load_state_dict(state)
    before_resume()
    got, _ = run(resumed, after)
    return state, expected, got


def _rank_entry(rank: int, world: int, port: int, out_dir: str, body: Callable[[int, str], dict]) -> None:
    import json
    from datetime import timedelta

    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=30)
    )
    try:
        result = body(rank, out_dir)
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump(result, f)
    finally:
        torch.distributed.destroy_process_group()


def run_ranks(body: Callable[[int, str], dict], out_dir: Any, world: int = 2) -> list[dict]:
    """Runs ``body(rank, out_dir) -> dict`` on ``world`` spawned ranks inside one gloo process group (a 30 s
    timeout, so a hang fails) and returns each rank's dict, through JSON. ``body`` must be a module-level function."""
    import json

    import torch.multiprocessing as mp

    mp.spawn(_rank_entry, args=(world, free_port(), str(out_dir), body), nprocs=world, join=True)
    return [json.loads(open(f"{out_dir}/rank{r}.json").read()) for r in range(world)]


def roundtrip(state: Any) -> Any:
    """Saves and loads ``state`` the way Lightning loads a local checkpoint (``weights_only=True``)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _assert_resumes_identically(
    make: Callable[[], Any],
    run: Callable[[Any, int], list[Any]],
    *,
    before: int,
    after: int,
    compare: Callable[[Any, Any], None] | None = None,
) -> None:
    """Runs ``before + after`` steps in one go, and ``before`` steps, checkpoint, fresh object, ``after`` steps;
    the outputs of the last ``after`` steps must be identical.

    ``make()`` builds a fresh object, ``run(obj, n)`` advances it ``n`` steps and returns one output per step.
    The state dict goes through ``torch.save``/``torch.load(weights_only=True)`` on the way.
    """
    whole = run(make(), before + after)
    first = make()
    run(first, before)
    state = roundtrip(first.state_dict())
    second = make()
    second.load_state_dict(state)
    rest = run(second, after)
    assert len(rest) == after
    for i, (a, b) in enumerate(zip(whole[before:], rest)):
        if compare is not None:
            compare(a, b)
        else:
            assert a == b, f"step {before + i} differs after resume: {a!r} != {b!r}"


@pytest.fixture
def assert_resumes_identically() -> Callable[..., None]:
    """The one resume check every stateful object uses (see :func:`_assert_resumes_identically`)."""
    return _assert_resumes_identically


import numpy as np  # noqa: E402

from odm.policies import DomainStats, Policy  # noqa: E402


class ChaseLoss(Policy):
    """A small deterministic learned policy for tests: ``p ∝ exp(EMA of each domain's mean loss)``."""

    def _init_state(self, num_domains: int) -> None:
        self._ema = np.zeros(num_domains)
        self._p = np.full(num_domains, 1.0 / num_domains)

    def update(self, stats: DomainStats) -> None:
        seen = stats.observed
        self._ema[seen] = 0.5 * self._ema[seen] + 0.5 * stats.mean_loss[seen]
        w = np.exp(self._ema - self._ema.max())
        self._p = w / w.sum()

    def _get_state(self) -> dict:
        return {"ema": self._ema.copy()}

    def _set_state(self, state: dict) -> None:
        self._ema = np.asarray(state["ema"], dtype=np.float64).copy()


@pytest.fixture
def chase_loss() -> type[ChaseLoss]:
    return ChaseLoss


class Recorder(Policy):
    """Wraps a policy (default :class:`ChaseLoss`) and keeps every ``DomainStats`` it is fed."""

    def __init__(
        self,
        inner: Policy | None = None,
        *,
        requires: frozenset[str] | None = None,
        wants: Callable[[int], bool] | None = None,
        exact: bool = False,
    ) -> None:
        super().__init__()
        self.inner = ChaseLoss() if inner is None else inner
        if requires is not None:
            self.requires = requires  # type: ignore[misc]
        self._wants = wants
        self._exact = exact
        self.seen: list[DomainStats] = []

    def _init_state(self, num_domains: int) -> None:
        self.inner.bind(num_domains)
        self._p = self.inner.proportions

    def update(self, stats: DomainStats) -> None:
        self.seen.append(stats)
        self.inner.update(stats)
        self._p = self.inner.proportions

    def wants_eval(self, step: int) -> bool:
        return self._wants is not None and self._wants(step)

    @property
    def exact_counts(self) -> bool:
        return self._exact

    def _get_state(self) -> dict:
        return {"inner": self.inner.state_dict()}

    def _set_state(self, state: dict) -> None:
        self.inner.load_state_dict(state["inner"])
