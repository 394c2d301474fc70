"""``MixtureLoader``: a drop-in ``DataLoader`` over a :class:`MixtureDataset` with its :class:`OnlineMixer`.

It also makes the stream exactly resumable, by one rule (the *cut*): ``mixer.step()`` marks a cut, and
``loader.state_dict()`` describes everything up to and including the newest batch observed before the last
``step()`` — every rank's and every worker slot's stream positions, and the mixer, saved once. A batch taken
but not yet stepped on (a worker's prefetch, Lightning's fetch-ahead) is replayed after a resume.

Every batch leaves its worker carrying its slot's stream positions after the batch; the loader keeps those
of the batches taken since the last cut (:class:`odm.loader_state.SlotRows`). Under ``torch.distributed`` each
``step()`` carries every rank's positions at the cut in its one all_reduce (a mixer payload), so
``state_dict()`` is local: rank 0 alone may call it, and that one file resumes every rank. On the next
``iter()`` — a new epoch, a resumed run, persistent workers or not — the workers read where to start from a
shared-memory block the loader fills before they start.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Mapping
from itertools import islice
from typing import Any

import numpy as np
import torch
import torch.utils.data

from odm._checks import check_choice, check_int, is_int
from odm._dist import comm_device, distributed, rank_world
from odm.dataset import STATE_KEY, MixtureDataset
from odm.hf_state import MAX_SKELETONS, skeleton_id
from odm.loader_state import CONFIG_KEYS, SlotRows, check_streams, config_diff, require
from odm.mixer import OnlineMixer
from odm.packing import PackedMixtureDataset
from odm.policies import Policy
from odm.remap import remap_stream_rows
from odm.topology import check_strided, plans_for, plans_from_state, plans_to_state

__all__ = ["MixtureLoader"]

_STATE_VERSION = 4
#: Older versions still loaded: 3 had no source state snapshots (its rows end with the active flags).
_LOADS = (3, 4)
#: The mixer payload carrying this rank's stream rows at the cut (see OnlineMixer.register_payload).
PAYLOAD = "loader/streams"
# DataLoader arguments that make no sense for a dataset that yields whole batches.
_REFUSED = ("sampler", "batch_sampler", "shuffle", "drop_last")


def _already_collated(batch: Any) -> Any:
    """DataLoader ``collate_fn``: the dataset yields whole, already collated batches."""
    return batch


class MixtureLoader(torch.utils.data.DataLoader):
    """A ``DataLoader`` that mixes named per-domain sources with live proportions.

    Iterate it as usual; each batch is a dict with the collated samples plus ``"domain"`` (``LongTensor[B]``)
    and ``"mix_step"`` (the global batch index). Feed losses back through ``loader.mixer``: ``observe(batch,
    per_sample_losses)`` per batch, ``step()`` once per optimizer step.

    Args:
        sources: ``{domain: source}`` (iterables, datasets, :mod:`odm.sources` objects).
        batch_size: samples per batch.
        policy: a :class:`odm.policies.Policy` or its name.
        num_workers: DataLoader worker processes.
        granularity: ``"sample"`` or ``"batch"`` (see :class:`MixtureDataset`).
        seed: seeds the draws and source shuffling; the same on every rank.
        collate_fn: turns a list of samples into a batch.
        exhausted / max_passes: see :class:`MixtureDataset`. Under DDP with ``"stop"`` or ``"drop"``, all ranks
            stop at the first batch any rank cannot make (one one-int all_reduce per batch, only then).
        num_batches: batches per epoch: ``len(loader) == num_batches`` and each ``iter()`` ends after them, so
            ``for batch in loader`` and epoch-based trainers end. Epoch ``e`` is global batches
            ``[e·N, (e+1)·N)``: a new epoch continues the stream, and an ``iter()`` started mid-epoch (a resumed
            run) yields the rest of that epoch. ``None`` (default): the loader streams until stopped.
        pack_length: pack documents into rows of this many tokens, mixing by **token shares** (see
            :class:`odm.packing.PackedMixtureDataset`): batches carry ``tokens_key`` ``[B, T]``, ``token_domain``,
            ``position_ids``, ``cu_seqlens``; feed ``mixer.observe(batch, per_token_losses)``. Documents are
            token-id sequences (or mappings holding one at ``tokens_key``); ``granularity``, ``collate_fn``,
            ``exhausted`` and ``max_passes`` do not apply.
        tokens_key: where packed documents hold their token ids, and the packed batch's key for them.
        delay: batches between a publish and the batch it applies to. Default
            ``num_workers * prefetch_factor + 2``: the batches a DataLoader may hold ahead of the training loop,
            plus two for loops that fetch the next batch before stepping (Lightning does). A loop that runs
            further ahead needs a larger delay, or its data depends on timing.
        update_every: update the policy every N-th ``mixer.step()``.
        dp_rank / dp_world_size: this replica's index and the number of data-parallel replicas; shards follow
            them. Default: the rank and size of ``process_group``. Model-parallel peers (same ``dp_rank``) get
            identical batches.
        process_group: the data-parallel group the mixer reduces statistics over (each replica counted
            once); default the world.
        floors / ceilings / frozen / history_every: bounds on the published proportions and how much of their
            history to keep; see :class:`~odm.mixer.OnlineMixer`.
        **dataloader_kwargs: passed to ``DataLoader`` (``pin_memory``, ``persistent_workers``,
            ``prefetch_factor``, ``multiprocessing_context``, …).

    Raises:
        TypeError: a ``DataLoader`` argument that a mixture sets itself (``shuffle``, ``sampler``, …), or a
            non-integer count.
        ValueError: a count out of range, and every check of :class:`MixtureDataset` and
            :class:`~odm.mixer.OnlineMixer`.

    Example:
        >>> loader = MixtureLoader({"a": list(range(100)), "b": list(range(100, 200))}, batch_size=4, num_batches=3)
        >>> batches = list(loader)
        >>> len(loader), [b["mix_step"] for b in batches], sorted(batches[0])
        (3, [0, 1, 2], ['data', 'domain', 'mix_step'])
        >>> [b["mix_step"] for b in loader]  # the next epoch continues the stream
        [3, 4, 5]
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
        num_batches: int | None = None,
        pack_length: int | None = None,
        tokens_key: str = "input_ids",
        delay: int | None = None,
        update_every: int = 1,
        dp_rank: int | None = None,
        dp_world_size: int | None = None,
        process_group: Any = None,
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
        num_workers = check_int(num_workers, "num_workers", low=0)
        batch_size = check_int(batch_size, "batch_size", low=1)
        self.num_batches = check_int(num_batches, "num_batches", low=1, allow_none=True)
        self._dp = self._check_dp(dp_rank, dp_world_size)
        if delay is None:
            prefetch = dataloader_kwargs.get("prefetch_factor")
            delay = num_workers * (2 if prefetch is None else check_int(prefetch, "prefetch_factor", low=1)) + 2
        dataset: MixtureDataset | PackedMixtureDataset
        if pack_length is None:
            dataset = MixtureDataset(
                sources,
                batch_size=batch_size,
                granularity=granularity,
                seed=seed,
                collate_fn=collate_fn,
                exhausted=exhausted,
                max_passes=max_passes,
            )
        else:
            unused = {"granularity": granularity != "sample", "collate_fn": collate_fn is not None}
            unused |= {"exhausted": exhausted != "restart", "max_passes": max_passes is not None}
            if any(unused.values()):
                raise ValueError(
                    f"`pack_length` packs documents by token shares; {[k for k, v in unused.items() if v]} do not "
                    "apply to packed batches (leave them at their defaults)"
                )
            dataset = PackedMixtureDataset(
                sources, batch_size=batch_size, pack_length=pack_length, seed=seed, tokens_key=tokens_key
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
            process_group=process_group,
        )
        self.process_group = process_group
        dataset.schedule = self.mixer.schedule
        dataset.attach_state = True
        self._num_slots = max(1, num_workers)  # each worker serves one slot; no workers: one slot
        self._slot_rows = SlotRows(self._num_slots, dataset.num_domains, row_len=dataset.state_width)
        # {skeleton id: skeleton} of the sources' state snapshots the workers reported (odm.hf_state).
        self._skeletons: dict[int, str] = {}
        # The shared block the workers read where to start from (see MixtureDataset.start_rows).
        self._start_rows = torch.full((1 + self._num_slots, self._slot_rows.row_len), -1, dtype=torch.int64)
        dataset.start_rows = self._start_rows.share_memory_()
        self.mixer.register_payload(PAYLOAD, self._slot_rows.payload, self._num_slots * self._slot_rows.row_len)
        # A checkpoint loaded since the last cut: (next batch, every rank's rows) — what state_dict() returns
        # until the next step() gathers fresh rows.
        self._loaded: tuple[int, list[Any]] | None = None
        self._iterators: weakref.WeakSet[Any] = weakref.WeakSet()
        self._agreed = False
        # NOTE: the dataset collates; without a collate_fn a DataLoader with batch_size=None runs default_convert
        # over every sample of every batch again (2/3 of the main-process time for small items).
        super().__init__(
            dataset, batch_size=None, num_workers=num_workers, collate_fn=_already_collated, **dataloader_kwargs
        )

    @staticmethod
    def _check_dp(dp_rank: Any, dp_world_size: Any) -> tuple[int | None, int | None]:
        dp_world_size = check_int(dp_world_size, "dp_world_size", low=1, allow_none=True)
        dp_rank = check_int(dp_rank, "dp_rank", low=0, allow_none=True)
        if (dp_rank is None) != (dp_world_size is None):
            raise ValueError(
                f"pass `dp_rank` and `dp_world_size` together (got dp_rank={dp_rank!r}, "
                f"dp_world_size={dp_world_size!r}), or neither to take them from `process_group`"
            )
        if dp_rank is not None and dp_world_size is not None and dp_rank >= dp_world_size:
            raise ValueError(f"`dp_rank` must be in [0, dp_world_size={dp_world_size}), got {dp_rank}")
        return dp_rank, dp_world_size

    @property
    def domains(self) -> list[str]:
        return self.mixer.domains

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError(
                "a MixtureLoader streams until stopped and has no length; pass `num_batches=N` for epochs of "
                "N batches (len(loader) == N)"
            )
        return self.num_batches

    def _dp_rank_world(self) -> tuple[int, int]:
        """This replica's data-parallel rank and the number of replicas (read at ``iter()``: the process
        group may start after the loader is built)."""
        dp_rank, dp_world = self._dp
        if dp_rank is not None and dp_world is not None:
            _, world = rank_world(self.process_group)
            if self.process_group is None and distributed() and world != dp_world:
                raise ValueError(
                    f"`dp_world_size`={dp_world} but the default process group has {world} ranks: pass "
                    "`process_group=` (the data-parallel group) so that each replica's statistics count once"
                )
            return dp_rank, dp_world
        return rank_world(self.process_group)

    def config(self) -> dict[str, Any]:
        """What determines this loader's batches (saved in its state, compared on load and across ranks)."""
        ds = self.dataset
        assert isinstance(ds, MixtureDataset | PackedMixtureDataset)
        return {
            "domains": list(ds.domains),
            "batch_size": ds.batch_size,
            "granularity": ds.granularity,
            "seed": ds.seed,
            "delay": self.mixer.delay,
            "num_workers": self.num_workers,
            "num_slots": self._num_slots,
            "dp_world_size": self._dp_rank_world()[1],
            "exhausted": ds.exhausted,
            "max_passes": list(ds.max_passes),
            "sources": [_describe_source(s) for s in ds.sources],
        }

    # -- iteration -------------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        ds = self.dataset
        assert isinstance(ds, MixtureDataset | PackedMixtureDataset)
        ds.rank, ds.world_size = self._dp_rank_world()
        group = self.process_group
        if not self._agreed and distributed(group):
            # The loader's first collective: every rank proves it runs the same configuration (a ValueError on
            # every rank naming the field and each rank's value), before any collective that could pair wrongly.
            fields = {f"loader.{k}": v for k, v in self.config().items() if k not in ("domains", "delay", "num_slots")}
            fields["loader.num_batches"] = self.num_batches
            self.mixer.agreement_fields.update(fields)
            self.mixer.check_agreement()
            self._agreed = True
        start = self._slot_rows.fill(self._start_rows)  # written before the workers (re)start: all of them read it
        ds.skeletons = self._skeletons  # (workers take a copy when they start)
        n = self.num_batches
        remaining = -1 if n is None else n - start % n
        sync = ds.exhausted != "restart" and distributed(group)
        it = self._track(self._batches(), start, remaining, sync)
        self._iterators.add(it)
        return it

    def _batches(self) -> Iterator[Any]:
        """The dataset's batches: through ``DataLoader.__iter__``, or — with no workers and nothing that needs
        torch's iterator (``pin_memory``, a ``timeout``) — straight from the dataset.

        NOTE: torch's single-process iterator only hands the dataset's batches through the identity
        ``collate_fn``, yet adds a profiler scope, a sampler and a fetcher call to every batch: a large share of
        the loader's own time for small batches. Its one other effect is kept: each iterator draws a base seed
        from ``generator`` (default: the global torch RNG), so the RNG stream after ``iter(loader)`` is the same.
        """
        if self.num_workers or self.pin_memory or self.timeout:
            return super().__iter__()
        torch.empty((), dtype=torch.int64).random_(generator=self.generator)
        return iter(self.dataset)

    def _track(self, it: Iterator[Any], start: int, remaining: int, sync: bool) -> Iterator[Any]:
        """Yields the batches of ``it``, recording each one's stream rows; ``remaining`` < 0: no end."""
        take = self._slot_rows.take
        served = self.mixer.note_served
        skeletons = self._skeletons
        from_numpy = torch.from_numpy
        # With several workers the DataLoader skips a worker whose slot is spent and serves the others' batches:
        # under "stop" the first missing batch index ends the iteration.
        stop_at_gap = self.dataset.exhausted == "stop" and self._num_slots > 1  # type: ignore[attr-defined]
        if sync or stop_at_gap:
            it = self._until_short(it, start, sync, stop_at_gap)
        # NOTE: this loop runs once per batch; a plain `for` over islice costs least.
        for batch in it if remaining < 0 else islice(it, remaining):
            state = batch.pop(STATE_KEY)
            b = batch["mix_step"]
            fresh = state.get("skeletons")
            if fresh and len(skeletons) < MAX_SKELETONS:
                skeletons.update(fresh)
            if "domain" in batch:  # packed batches carry `token_domain` instead
                batch["domain"] = from_numpy(batch["domain"])
            take(b, state["slot"], state["row"])
            served(b)
            yield batch

    def _until_short(self, it: Iterator[Any], expected: int, sync: bool, stop_at_gap: bool) -> Iterator[Any]:
        """``it`` up to the first missing batch index (``stop_at_gap``) or the first batch some rank lacks
        (``sync``: one all_reduce per batch)."""
        while True:
            batch = next(it, None)
            if batch is not None and stop_at_gap and batch["mix_step"] != expected:
                batch = None
            if sync and not self._all_ranks_have(batch is not None):
                return
            if batch is None:
                return
            expected = batch["mix_step"] + 1
            yield batch

    def _all_ranks_have(self, mine: bool) -> bool:
        """Whether every rank of the group has a batch (one MIN all_reduce of one int)."""
        flag = torch.tensor([int(mine)], dtype=torch.int32, device=comm_device(self.process_group))
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN, group=self.process_group)
        return bool(flag.item())

    def _live_iterator(self) -> bool:
        return any(it.gi_frame is not None for it in self._iterators)

    # -- state -----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The mixer and every rank's stream positions at the cut: the newest batch observed before the last
        ``mixer.step()`` (single process, before any such step: the newest batch taken).

        Local (no collective): rank 0 alone may call it, and the one file resumes every rank.

        Raises:
            RuntimeError: under ``torch.distributed``, batches were taken but the mixer never stepped on one
                (the other ranks' positions are only known through ``step()``).
        """
        ds = self.dataset
        assert isinstance(ds, MixtureDataset | PackedMixtureDataset)
        cut = self.mixer.cut_batch
        gathered = self.mixer.gathered(PAYLOAD)  # (read first: in one process it is computed now, moving the cut)
        _, dp_world = self._dp_rank_world()
        if self._loaded is not None and not self._slot_rows.cut_moved:
            next_batch, streams = self._loaded
        elif cut is not None:
            next_batch = cut + 1
            assert gathered is not None  # set by every step() since the loader registered it
            shape = (len(gathered), self._num_slots, self._slot_rows.row_len)
            streams = np.asarray(gathered, dtype=np.int64).reshape(shape).tolist()
        elif dp_world > 1 and self._slot_rows.next_batch > 0:
            raise RuntimeError(
                "loader.state_dict() under torch.distributed before the mixer stepped on any batch: the other "
                "ranks' stream positions travel with mixer.step(). Call loader.mixer.observe(batch, losses) and "
                "loader.mixer.step() once per training step before checkpointing"
            )
        else:
            next_batch, rows = self._slot_rows.newest_state()
            streams = [rows] * dp_world if dp_world > 1 else [rows]
        if any(v == SlotRows.UNKNOWN for rank in streams for row in rank for v in row[:1]):
            raise RuntimeError(
                f"the stream positions at batch {cut} are no longer known: the loop took more than "
                f"{SlotRows.CAPACITY} batches past the last one the mixer stepped on; call mixer.step() once per "
                "training step"
            )
        plans, k = ds.plans, ds.num_domains
        if plans is not None and all(r[0] >= 0 and min(r[1 : 1 + k]) >= 0 for rows in streams for r in rows):
            plans = None  # every shard has read its plan: the regular passes do not depend on it
        return {
            "version": _STATE_VERSION,
            "config": self.config(),
            "next_batch": int(next_batch),
            "streams": streams,  # [rank][slot] -> stream row
            "plans": None if plans is None else plans_to_state(plans),  # after a resume on another topology
            "snapshots": self._snapshots_state(streams),
            "mixer": self.mixer.state_dict(),
        }

    def _widths(self) -> list[int]:
        """Per domain, the snapshot columns that end each stream row (packed rows too)."""
        ds = self.dataset
        assert isinstance(ds, MixtureDataset | PackedMixtureDataset)
        return ds.snapshot_widths

    def _snapshots_state(self, streams: list[Any]) -> dict[str, Any]:
        """The snapshot layout and the skeletons the rows refer to (an unknown one is left out: that slot's
        resume skips instead)."""
        widths, at = self._widths(), self._slot_rows.row_len - sum(self._widths())
        ids: set[int] = set()
        for w in widths:
            ids.update(int(row[at + 1]) for rows in streams for row in rows if w and row[at] >= 0)
            at += w
        return {"widths": widths, "skeletons": [self._skeletons[i] for i in sorted(ids) if i in self._skeletons]}

    def _saved_widths(self, state_dict: Mapping[str, Any], num_domains: int) -> tuple[list[int], list[str]]:
        """A checkpoint's snapshot widths per domain and skeletons (version 3: none; a packed loader's version-4
        checkpoint written before packed rows took snapshots: widths of 0, and its rows resume by skipping)."""
        if state_dict["version"] == 3:
            return [0] * num_domains, []
        snaps = require(state_dict, "snapshots")
        widths, skeletons = require(snaps, "widths", path="snapshots"), require(snaps, "skeletons", path="snapshots")
        if not (isinstance(widths, list) and len(widths) == num_domains and all(is_int(w) and w >= 0 for w in widths)):
            raise ValueError(f"loader state snapshots.widths must be {num_domains} integers >= 0, got {widths!r:.80}")
        if not (isinstance(skeletons, list) and all(isinstance(x, str) for x in skeletons)):
            raise ValueError(f"loader state snapshots.skeletons must be a list of strings, got {skeletons!r:.80}")
        return [int(w) for w in widths], skeletons

    def load_state_dict(self, state_dict: Mapping[str, Any], *, reshard: bool = False, domains: str = "same") -> None:
        """Resumes from :meth:`state_dict`: the next batch is the one after the cut, bit for bit, on every rank.

        Args:
            state_dict: the saved state.
            reshard: allow a checkpoint taken with another number of workers or data-parallel ranks. Per domain,
                every sample of each pass begun is still read exactly once; the order is not kept (see
                :mod:`odm.topology`). Strided sources only (lists, iterables, map-style, JSONL, text).
            domains: ``"remap"`` allows a checkpoint of another domain set: common domains keep their stream
                positions and policy state, a new one starts fresh (see :mod:`odm.remap`).

        Raises:
            RuntimeError: an iterator of this loader is still live (finish it or ``del`` it first).
            ValueError: another version; a missing or malformed entry (named by its key path); another
                configuration than the checkpoint's (every difference spelled out); another domain set.
        """
        if self._live_iterator():
            raise RuntimeError(
                "load_state_dict() while an iterator of this loader is live would mix the restored state with "
                "batches already in flight; finish the loop (or `del` the iterator) first, then iter(loader) "
                "again after loading"
            )
        version = require(state_dict, "version")
        if version not in _LOADS:
            raise ValueError(f"loader state has version {version!r}, expected one of {list(_LOADS)}")
        saved = require(state_dict, "config")
        for key in CONFIG_KEYS:
            require(saved, key, path="config")
        mine = self.config()
        # What the opt-ins allow to differ is compared as equal; everything else must match.
        # (The default delay follows num_workers; batches after a reshard are not the old topology's anyway.)
        allowed: tuple[str, ...] = ("num_workers", "num_slots", "dp_world_size", "delay") if reshard else ()
        remap = check_choice(domains, "domains", ("same", "remap")) == "remap" and saved["domains"] != mine["domains"]
        allowed += ("domains", "sources", "max_passes") if remap else ()
        diff = config_diff({**saved, **{k: mine[k] for k in allowed}}, mine)
        if diff:
            raise ValueError(
                f"the checkpoint's loader differs from this one in what determines the batches: {diff}. "
                "Resume with the same settings (another topology: load_state_dict(state, reshard=True); "
                "another domain set: domains='remap')"
            )
        ds = self.dataset
        assert isinstance(ds, MixtureDataset | PackedMixtureDataset)
        dp_rank, dp_world = self._dp_rank_world()
        next_batch = check_int(require(state_dict, "next_batch"), "next_batch", low=0)
        saved_plans = state_dict.get("plans")
        plans = None if saved_plans is None else plans_from_state(saved_plans)
        old_world, old_slots = int(saved["dp_world_size"]), int(saved["num_slots"])
        widths = self._widths()
        saved_widths, skeletons = self._saved_widths(state_dict, len(saved["domains"]))
        base = self._slot_rows.row_len - sum(widths)  # the rows without their snapshot columns
        saved_base = 1 + 3 * len(saved["domains"]) if remap else base
        streams = check_streams(
            require(state_dict, "streams"),
            world=old_world,
            num_slots=old_slots,
            row_len=saved_base + sum(saved_widths),
            num_domains=len(saved["domains"]),
            flags=not isinstance(ds, PackedMixtureDataset),
            min_epoch=0 if plans is None else -max(len(w.plan) for shard in plans for w in shard),
        )
        # Snapshots are kept where the layout is unchanged; elsewhere none (those slots resume by skipping).
        keep = saved_widths == widths and not remap and (old_world, old_slots) == (dp_world, self._num_slots)
        tails = [[row[saved_base:] if keep else [-1] * sum(widths) for row in rows] for rows in streams]
        streams = [[row[:saved_base] for row in rows] for rows in streams]
        if remap:
            if plans is not None or isinstance(ds, PackedMixtureDataset):
                raise ValueError("domains='remap' needs a checkpoint of an unpacked loader that was not resharded")
            streams = [remap_stream_rows(rows, saved["domains"], mine["domains"]) for rows in streams]
        if (old_world, old_slots) != (dp_world, self._num_slots):
            if isinstance(ds, PackedMixtureDataset) or (self.persistent_workers and self._iterator is not None):
                raise ValueError("reshard=True needs an unpacked loader whose workers have not started yet")
            check_strided(ds.domains, ds.sources, min(old_world * old_slots, dp_world * self._num_slots))
            plans = plans_for(streams, plans, dp_world * self._num_slots)
            streams = [[[-1] * base] * self._num_slots for _ in range(dp_world)]
            tails = [[[-1] * sum(widths)] * self._num_slots for _ in range(dp_world)]
        streams = [[row + tail for row, tail in zip(rows, ts)] for rows, ts in zip(streams, tails)]
        self.mixer.load_state_dict(require(state_dict, "mixer"), path="mixer", domains="remap" if remap else "same")
        ds.plans = plans
        for skeleton in skeletons:
            self._skeletons[skeleton_id(skeleton)] = skeleton
        self._slot_rows.restore(next_batch, streams[dp_rank])
        self._loaded = (next_batch, streams)


def _describe_source(source: Any) -> str:
    """A source's kind and, for a map-style one, its length (which its shuffles depend on)."""
    name = type(source).__name__
    dataset = getattr(source, "dataset", None)
    if name == "MapSource" and dataset is not None:
        return f"{name}(len={len(dataset)})"
    return name
