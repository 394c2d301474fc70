"""``MixtureLoader``: a drop-in ``DataLoader`` over a :class:`MixtureDataset` with its :class:`OnlineMixer`.

It also makes the stream resumable. Every batch leaves its worker carrying that worker's stream positions
*after* the batch; the loader keeps the positions of the batches the training loop has actually taken (not
the ones still prefetched), so ``state_dict()`` describes exactly "everything up to batch b". On the next
``iter()`` — a new epoch, a resumed run, persistent workers or not — the workers read where to start from a
shared-memory block the loader fills before they start.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
import torch.utils.data

from odm._dist import rank_world
from odm.dataset import STATE_KEY, MixtureDataset
from odm.mixer import OnlineMixer
from odm.policies import Policy

__all__ = ["MixtureLoader"]

_STATE_VERSION = 2
# DataLoader arguments that make no sense for a dataset that yields whole batches.
_REFUSED = ("sampler", "batch_sampler", "shuffle", "drop_last")


def _already_collated(batch: Any) -> Any:
    """DataLoader ``collate_fn``: the dataset yields whole, already collated batches."""
    return batch


class MixtureLoader(torch.utils.data.DataLoader):
    """A ``DataLoader`` that mixes named per-domain sources with live proportions.

    Iterate it as usual; each batch is a dict with the collated samples plus ``"domain"`` (``LongTensor[B]``)
    and ``"mix_step"``. Feed losses back through ``loader.mixer``.

    Args:
        sources: ``{domain: source}`` (iterables, datasets, :mod:`odm.sources` objects).
        batch_size: samples per batch.
        policy: a :class:`odm.policies.Policy` or its name.
        num_workers: DataLoader worker processes.
        granularity: ``"sample"`` or ``"batch"`` (see :class:`MixtureDataset`).
        seed: seeds the draws and source shuffling.
        collate_fn: turns a list of samples into a batch.
        exhausted / max_passes: see :class:`MixtureDataset`.
        delay: batches between a publish and the batch it applies to. Default
            ``num_workers * prefetch_factor + 2``: the batches a DataLoader may hold ahead of the training loop,
            plus two for loops that fetch the next batch before stepping (Lightning does). A loop that runs
            further ahead needs a larger delay, or its data depends on timing.
        update_every: update the policy every N-th ``mixer.step()``.
        floors / ceilings / frozen / history_every: bounds on the published proportions and how much of their
            history to keep; see :class:`~odm.mixer.OnlineMixer`.
        **dataloader_kwargs: passed to ``DataLoader`` (``pin_memory``, ``persistent_workers``,
            ``prefetch_factor``, ``multiprocessing_context``, …).

    Example:
        >>> loader = MixtureLoader({"a": list(range(100)), "b": list(range(100, 200))}, batch_size=4)
        >>> batch = next(iter(loader))
        >>> sorted(batch), batch["domain"].shape
        (['data', 'domain', 'mix_step'], torch.Size([4]))
    """

    def __init__(
        self,
        sources: Mapping[str, Any],
        *,
        batch_size: int,
        policy: str | Policy = "uniform",
        num_workers: int = 0,
        granularity: str = "sample",
        seed: int = 0,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        exhausted: str = "restart",
        max_passes: int | Mapping[str, int] | None = None,
        delay: int | None = None,
        update_every: int = 1,
        floors: Any = None,
        ceilings: Any = None,
        frozen: Any = None,
        history_every: int | None = 1,
        **dataloader_kwargs: Any,
    ) -> None:
        for key in _REFUSED:
            if key in dataloader_kwargs:
                raise TypeError(
                    f"MixtureLoader does not take `{key}`: it yields whole batches drawn by the mixer "
                    "(use `batch_size`, `seed` and `exhausted` instead)"
                )
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"`num_workers` must be a non-negative integer, got {num_workers!r}")
        prefetch = dataloader_kwargs.get("prefetch_factor")
        if delay is None:
            delay = num_workers * (prefetch if prefetch is not None else 2) + 2
        dataset = MixtureDataset(
            sources,
            batch_size=batch_size,
            granularity=granularity,
            seed=seed,
            collate_fn=collate_fn,
            exhausted=exhausted,
            max_passes=max_passes,
        )
        self.mixer = OnlineMixer(
            dataset.domains,
            policy=policy,
            delay=delay,
            update_every=update_every,
            seed=seed,
            floors=floors,
            ceilings=ceilings,
            frozen=frozen,
            history_every=history_every,
        )
        dataset.schedule = self.mixer.schedule
        dataset.attach_state = True
        k = dataset.num_domains
        # Row 0: [next global batch, …]; row 1 + slot: [next_batch, epochs(K), positions(K), active(K)] of the
        # slot's streams, -1 while fresh (see MixtureDataset).
        self._rows = max(1, num_workers)
        dataset.resume = torch.full((1 + self._rows, 1 + 3 * k), -1, dtype=torch.int64).share_memory_()
        self._taken = dataset.resume.clone()  # the same block, as of the batches the loop has taken
        # Recent (batch index -> that worker's row) so a checkpoint can be cut at an earlier batch than the
        # newest taken (Lightning fetches one batch ahead of the step it runs).
        self._recent: deque[tuple[int, int, list[int]]] = deque(maxlen=64)
        # NOTE: the dataset collates; without a collate_fn a DataLoader with batch_size=None runs default_convert
        # over every sample of every batch again (2/3 of the main-process time for small items).
        super().__init__(
            dataset, batch_size=None, num_workers=num_workers, collate_fn=_already_collated, **dataloader_kwargs
        )

    @property
    def domains(self) -> list[str]:
        return self.mixer.domains

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        ds = self.dataset
        assert isinstance(ds, MixtureDataset)
        ds.rank, ds.world_size = rank_world()
        assert ds.resume is not None
        # Written before the workers are (re)started, so fresh and persistent workers alike read it.
        ds.resume.copy_(self._taken)
        return self._track(super().__iter__())

    def _track(self, it: Iterator[Any]) -> Iterator[Any]:
        for batch in it:
            state = batch.pop(STATE_KEY)
            batch["domain"] = torch.from_numpy(batch["domain"])
            slot = int(state["slot"])
            row = [int(x) for x in state["row"]]
            self._taken[1 + slot] = torch.tensor(row, dtype=torch.int64)
            self._taken[0, 0] = row[0]
            self._recent.append((row[0] - 1, slot, row))
            yield batch

    # -- state -----------------------------------------------------------------------------------------------
    def state_dict(self, *, upto: int | None = None) -> dict[str, Any]:
        """The mixer and the stream positions after batch ``upto`` (default: the newest batch taken).

        ``upto`` lets a loop that fetches ahead (Lightning) cut the state at the batch it last trained on;
        it must be one of the last 64 batches taken.

        NOTE: under ``torch.distributed`` this is a collective (every rank's stream positions are gathered, so
        the one checkpoint rank 0 writes resumes every rank): call it on every rank, as Lightning and Fabric do.
        """
        taken = self._taken.clone()
        next_batch = max(0, int(taken[0, 0]))
        if upto is not None and upto != next_batch - 1:
            rows = {b: (w, r) for b, w, r in self._recent}
            if upto not in rows:
                raise ValueError(f"`upto`={upto} is not among the recent batches taken ({sorted(rows)})")
            # Rewind every slot to its newest batch at or before `upto`.
            nw = self._rows
            for slot in range(nw):
                mine = [b for b in rows if b <= upto and b % nw == slot]
                taken[1 + slot] = torch.tensor(rows[max(mine)][1], dtype=torch.int64) if mine else -1
            next_batch = upto + 1
        streams: list[Any] = [taken[1:].tolist()]
        _, world = rank_world()
        if world > 1:
            streams = [None] * world
            torch.distributed.all_gather_object(streams, taken[1:].tolist())
        return {
            "version": _STATE_VERSION,
            "num_workers": self._rows if self.num_workers > 0 else 0,
            "world_size": world,
            "next_batch": next_batch,
            "streams": streams,  # one block per rank
            "mixer": self.mixer.state_dict(),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Resumes from :meth:`state_dict`: the next batch is the one after the saved one, bit for bit.

        Raises:
            ValueError: another ``num_workers``, world size or domain set than the checkpoint's.
        """
        if state_dict.get("version") != _STATE_VERSION:
            raise ValueError(f"loader state has version {state_dict.get('version')!r}, expected {_STATE_VERSION}")
        nw = self._rows if self.num_workers > 0 else 0
        if state_dict["num_workers"] != nw:
            raise ValueError(
                f"the checkpoint was taken with num_workers={state_dict['num_workers']}, this loader has "
                f"num_workers={nw}; each worker reads its own shard, so resume with the same num_workers"
            )
        rank, world = rank_world()
        if state_dict["world_size"] != world:
            raise ValueError(
                f"the checkpoint was taken with world size {state_dict['world_size']}, this run has {world}"
            )
        self.mixer.load_state_dict(state_dict["mixer"])
        self._taken[1:] = torch.tensor(np.asarray(state_dict["streams"][rank]), dtype=torch.int64)
        self._taken[0, 0] = int(state_dict["next_batch"])
        self._recent.clear()
