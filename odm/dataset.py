"""``MixtureDataset``: whole batches drawn from per-domain streams with live, shared proportions.

Runs inside each DataLoader worker. For global batch ``b`` it (1) looks up the proportions row in force for
``b`` in the shared :class:`~odm.schedule.ProportionSchedule`, (2) draws the domain of each sample from a
counter-based generator keyed by ``(seed, rank, worker)`` with counter ``b``, (3) pulls the samples from the
per-domain streams of its shard, (4) collates and tags the batch with ``domain`` and ``mix_step``.

With ``W`` workers, the DataLoader returns batches round-robin from its workers, so the worker that serves
the ``j``-th batch of an iteration makes global batches ``≡ start + j (mod W)``: it takes the *slot*
``(worker + start) mod W``, and each slot owns a disjoint shard of every domain and its own random key. A run's
data is therefore a function of the seed, the sources, ``W``, the world size and the published proportions —
not of worker timing, nor of where an iteration (re)started.

Sharding: slot ``w`` of rank ``r`` reads shard ``r * W + w`` of ``world_size * W`` of every domain, under the
contract of :mod:`odm.sources` (sharded by odm or by the source, never both; every sample once per pass). The
draw key holds the rank, so ranks draw different domain sequences; pass orders hold only the run's seed, so
ranks agree on them. A slot's stream state travels as a :class:`StreamRow`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from itertools import islice
from operator import itemgetter
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.utils.data
from torch.utils.data import default_collate

from odm._checks import check_choice, check_int, check_seed
from odm._draw import inverse_cdf, largest_remainder
from odm.hf_state import MAX_SKELETONS
from odm.schedule import MODE_EXACT, ProportionSchedule
from odm.sources import Source, as_source
from odm.topology import Work, open_progression

__all__ = ["EXHAUSTED_MODES", "GRANULARITIES", "MixtureDataset", "StreamRow", "largest_remainder"]

GRANULARITIES = ("sample", "batch")
EXHAUSTED_MODES = ("restart", "stop", "drop")
#: Batch key carrying the slot's stream state to :class:`odm.MixtureLoader` (removed before the user sees it).
STATE_KEY = "_odm_state"
_STATE_VERSION = 1
#: ``StreamRow.next_batch`` of a slot that has not produced a batch yet (its streams start fresh).
FRESH = -1


class StreamRow(NamedTuple):
    """One slot's stream state: what a worker attaches to each batch and the loader keeps in shared memory.

    Flat, it is the int64 row ``[next_batch, epochs(K), positions(K), active(K)]`` (:meth:`pack` /
    :meth:`unpack`); ``next_batch == -1`` marks a slot that has produced no batch yet (fresh streams).

    Example:
        >>> row = StreamRow(7, [0, 1], [5, 2], [1, 1]).pack()
        >>> row, StreamRow.width(2), StreamRow.unpack(row, 2).positions
        ([7, 0, 1, 5, 2, 1, 1], 7, [5, 2])
    """

    #: The global batch this slot makes next.
    next_batch: int
    #: Each domain's pass (epoch) in this slot's shard.
    epochs: list[int]
    #: Items of the current pass each domain's shard has consumed.
    positions: list[int]
    #: 1 while a domain is still drawn, 0 once dropped (``exhausted="drop"`` / ``max_passes``).
    active: list[int]

    @staticmethod
    def width(num_domains: int) -> int:
        """Length of the flat row for ``num_domains`` domains."""
        return 1 + 3 * num_domains

    def pack(self) -> list[int]:
        """The flat row ``[next_batch, epochs…, positions…, active…]``."""
        return [self.next_batch, *self.epochs, *self.positions, *self.active]

    @classmethod
    def unpack(cls, row: Any, num_domains: int) -> StreamRow:
        """Reads a flat row (a list, numpy array or tensor row) of ``num_domains`` domains."""
        values = [int(x) for x in (row.tolist() if hasattr(row, "tolist") else row)]
        k = num_domains
        if len(values) != cls.width(k):
            raise ValueError(f"a stream row for {k} domains has {cls.width(k)} entries, got {len(values)}")
        return cls(values[0], values[1 : 1 + k], values[1 + k : 1 + 2 * k], values[1 + 2 * k :])


class _Exhausted(Exception):
    """Internal: every domain of this slot's shard is spent (or one is, with ``exhausted="stop"``)."""


class _DomainStream:
    """One domain's stream in one shard: the source plus its explicit position ``(epoch, position)``."""

    __slots__ = (
        "_it", "epoch", "max_passes", "name", "num_shards", "position", "seed", "shard", "skeletons", "snap",
        "source", "width", "work",
    )  # fmt: skip

    def __init__(self, name: str, source: Source, shard: int, num_shards: int, seed: int, max_passes: int | None):
        self.name, self.source, self.shard, self.num_shards = name, source, shard, num_shards
        self.seed, self.max_passes = seed, max_passes
        self.epoch = 0
        self.position = 0
        self._it: Iterator[Any] | None = None
        # A source that resumes from snapshots of its own state (odm.hf_sources.HFIterableSource): the columns its
        # snapshot takes in the stream row, the one restored for the current pass, the skeletons to decode it.
        self.width: int = getattr(source, "snapshot_width", 0)
        self.snap: list[int] | None = None
        self.skeletons: Mapping[int, str] | None = None
        # After a resume on another topology (odm.topology): the rest of the begun passes this shard reads first.
        # While it does, `epoch` is -(i + 1) for plan item i.
        self.work: Work | None = None

    def iterator(self) -> Iterator[Any]:
        """The open iterator of the current pass, from ``position``."""
        if self._it is None:
            try:
                if self.epoch < 0:
                    assert self.work is not None
                    prog = self.work.plan[-self.epoch - 1]
                    self._it = open_progression(self.source, prog, start=self.position, seed=self.seed)
                else:
                    where: dict[str, Any] = {"shard": self.shard, "num_shards": self.num_shards, "epoch": self.epoch}
                    if self.width and self.snap is not None:
                        where |= {"snapshot": self.snap, "skeletons": self.skeletons}
                    self._it = self.source.open(**where, start=self.position, seed=self.seed)
            except Exception as err:
                raise self.error(err, self.position) from err
        return self._it

    def extend(self, out: list[Any], n: int) -> int:
        """Appends up to ``n`` items of the current pass to ``out`` (fewer only at the end of the pass);
        returns how many."""
        before = len(out)
        try:
            out.extend(islice(self.iterator(), n))
        except Exception as err:
            # `extend` keeps the items appended before the failure: the failing item is the next one.
            raise self.error(err, self.position + len(out) - before) from err
        got = len(out) - before
        self.position += got
        return got

    def snapshot(self) -> list[int]:
        """The snapshot columns of this stream's row: the open pass's newest snapshot, else the restored one,
        else none (``-1``)."""
        it = self._it
        snap = self.snap if it is None else getattr(it, "snapshot", None)
        return [-1] * self.width if snap is None else snap

    def error(self, err: Exception, item: int) -> RuntimeError:
        if isinstance(err, RuntimeError) and str(err).startswith("the source of domain"):
            return err
        return RuntimeError(
            f"the source of domain {self.name!r} raised {type(err).__name__}: {err} "
            f"(shard {self.shard} of {self.num_shards}, pass {self.epoch}, item {item} of the shard's pass)"
        )

    def next_in_plan(self) -> bool:
        """Moves to the next item of a resharding plan; False when not inside one or at its last item."""
        if self.epoch >= 0 or self.work is None or -self.epoch >= len(self.work.plan):
            return False
        self.epoch, self.position, self._it, self.snap = self.epoch - 1, 0, None, None
        return True

    def next_pass(self) -> bool:
        """Starts the next pass; False once the repetition budget ``max_passes`` is spent."""
        nxt = self.epoch + 1 if self.epoch >= 0 or self.work is None else self.work.next_epoch
        if self.max_passes is not None and nxt >= self.max_passes:
            return False
        self.epoch = nxt
        self.position = 0
        self._it = None
        self.snap = None
        return True


def fresh_skeletons(streams: list[Any]) -> dict[int, str] | None:
    """The snapshot skeletons the open iterators of ``streams`` first saw since the last call (``None``: none);
    each goes to the main process once, with the batch state.

    They are also added to the streams' own skeletons: a persistent worker then decodes the snapshots whose
    skeletons it has seen itself when a checkpoint is loaded after it started (the loader's skeletons reach
    workers only at their start).
    """
    out = None
    for s in streams:
        fresh = getattr(s._it, "fresh", None)
        if fresh:
            out = {**(out or {}), **fresh}
            fresh.clear()
    if out:
        for s in streams:
            known = s.skeletons
            if isinstance(known, dict) and len(known) < MAX_SKELETONS:
                known.update(out)
    return out


def _refuse_list_rows(domains: list[str], sources: list[Source]) -> None:
    """With the default collate, refuses a Hugging Face dataset whose rows hold Python lists.

    ``default_collate`` zips a batch of equal-length lists into a list of per-position tensors: a silently
    transposed batch, not an error.
    """
    for domain, src in zip(domains, sources):
        data = getattr(src, "dataset", None)
        if data is None or type(data).__module__.split(".")[0] != "datasets":
            continue
        from odm.hf_sources import list_columns

        cols = list_columns(data)
        if cols:
            raise TypeError(
                f"source of domain {domain!r}: this Hugging Face dataset returns the columns {cols} as Python "
                "lists, which the default collate would transpose (a list of [B] tensors instead of one [B, L] "
                "tensor); pass `ds.with_format('torch')` (or 'numpy'), or give a `collate_fn`"
            )


class MixtureDataset(torch.utils.data.IterableDataset):
    """An ``IterableDataset`` of whole batches mixed from named per-domain sources.

    Use it with ``DataLoader(dataset, batch_size=None, num_workers=...)``, or use :class:`odm.MixtureLoader`,
    which does that, connects an :class:`odm.OnlineMixer` and makes the stream resumable.

    Args:
        sources: ``{domain name: source}``; a source is anything :func:`odm.sources.as_source` accepts.
        batch_size: samples per batch.
        schedule: the shared proportions; default: a new uniform schedule.
        granularity: ``"sample"`` (each sample draws its domain) or ``"batch"`` (one domain per batch, as ODM).
        seed: seeds the domain draws and source shuffling.
        collate_fn: turns a list of samples into a batch (default ``torch.utils.data.default_collate``).
        exhausted: what happens when a domain's shard ends: ``"restart"`` a new pass (reshuffled where the
            source shuffles), ``"stop"`` the whole iteration (the partial batch is dropped), or ``"drop"`` the
            domain, renormalising the others (when the last domain runs out, the final batch comes out short:
            no sample is lost).
        max_passes: optional repetition budget, one int for all domains or ``{domain: int}``: a domain is
            dropped once it has been read that many times (UniMax-style epoch caps).

    Each batch is a dict. When samples are mappings the collated mapping gets two keys; otherwise the
    collated samples sit under ``"data"``:

    * ``"domain"``: ``LongTensor[B]``, the domain index of each sample;
    * ``"mix_step"``: the global batch index ``b`` — the schedule row in force for ``b`` drew it.

    Raises:
        ValueError: no domains, ``batch_size < 1``, unknown ``granularity`` / ``exhausted``, a bad
            ``max_passes``.
        TypeError: a domain name that is not a string, a source that is not iterable (or a set, a dict, a
            one-shot iterator), a Hugging Face dataset with Python-list rows under the default collate.

    Example:
        >>> ds = MixtureDataset({"a": [0, 1, 2], "b": [10, 11, 12]}, batch_size=4, max_passes=1)
        >>> sorted(x for batch in ds for x in batch["data"].tolist())
        [0, 1, 2, 10, 11, 12]
    """

    def __init__(
        self,
        sources: Mapping[str, Any],
        *,
        batch_size: int,
        schedule: ProportionSchedule | None = None,
        granularity: str = "sample",
        seed: int = 0,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        exhausted: str = "restart",
        max_passes: int | Mapping[str, int] | None = None,
    ) -> None:
        if not isinstance(sources, Mapping):
            raise TypeError(f"`sources` must be a mapping {{domain name: source}}, got {type(sources).__name__}")
        if len(sources) == 0:
            raise ValueError("`sources` is empty: a mixture needs at least one domain")
        for name in sources:
            if not isinstance(name, str) or not name:
                raise TypeError(f"domain names must be non-empty strings, got {name!r}")
        batch_size = check_int(batch_size, "batch_size", low=1)
        granularity = check_choice(granularity, "granularity", GRANULARITIES)
        exhausted = check_choice(exhausted, "exhausted", EXHAUSTED_MODES)
        seed = check_seed(seed)
        self.domains: list[str] = list(sources)
        self.sources: list[Source] = [as_source(s, domain=d) for d, s in sources.items()]
        if collate_fn is None:
            _refuse_list_rows(self.domains, self.sources)
        self.batch_size = batch_size
        self.granularity = granularity
        self.seed = seed
        self.collate_fn = collate_fn if collate_fn is not None else default_collate
        self.exhausted = exhausted
        self.max_passes = self._check_max_passes(max_passes)
        if schedule is None:
            schedule = ProportionSchedule(len(self.domains))
        if schedule.num_domains != len(self.domains):
            raise ValueError(f"`schedule` has {schedule.num_domains} domains but `sources` has {len(self.domains)}")
        self.schedule = schedule
        # Set by the main process before workers start (see odm.MixtureLoader).
        # After a resume on another topology: per shard (rank * num_workers + slot), per domain, the rest of the
        # begun passes that shard reads first (odm.topology.reshard).
        self.plans: list[list[Work]] | None = None
        self.rank = 0
        self.world_size = 1
        self.attach_state = False
        # {skeleton id: skeleton} of the sources' state snapshots (odm.hf_state), set by the loader before the
        # workers start: what a restored snapshot is decoded with.
        self.skeletons: dict[int, str] = {}
        # Shared (1 + num_workers, state_width) int64 block, or None: row 0 holds the next global batch in column 0;
        # row 1 + slot holds that slot's stream state (see MixtureIterator.state_row), -1 when fresh.
        self.start_rows: torch.Tensor | None = None

    def _check_max_passes(self, max_passes: Any) -> list[int | None]:
        k = len(self.domains)
        if max_passes is None:
            return [None] * k
        if isinstance(max_passes, Mapping):
            unknown = set(max_passes) - set(self.domains)
            if unknown:
                raise ValueError(f"`max_passes` names unknown domains {sorted(unknown)}; domains: {self.domains}")
            values = [max_passes.get(d) for d in self.domains]
        else:
            values = [max_passes] * k
        return [check_int(v, "max_passes", low=1, allow_none=True) for v in values]

    @property
    def num_domains(self) -> int:
        return len(self.domains)

    @property
    def snapshot_widths(self) -> list[int]:
        """Per domain, the columns its source's state snapshot takes at the end of a stream row (0: none)."""
        return [getattr(s, "snapshot_width", 0) for s in self.sources]

    @property
    def state_width(self) -> int:
        """Length of a slot's stream-state row: the :class:`StreamRow`, then each snapshot's columns (as for
        ``odm.packing``'s dataset)."""
        return StreamRow.width(self.num_domains) + sum(self.snapshot_widths)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        start = 0 if self.start_rows is None else max(0, int(self.start_rows[0, 0]))
        return MixtureIterator(self, slot=(worker + start) % num_workers, num_slots=num_workers, start=start)


class MixtureIterator:
    """The iteration state of one slot (batches ``≡ slot mod num_slots``): its batch counter and each domain
    stream's position ``(epoch, position)``."""

    def __init__(self, dataset: MixtureDataset, *, slot: int, num_slots: int, start: int = 0) -> None:
        self.ds = dataset
        self.slot, self.num_slots = slot, num_slots
        shard = dataset.rank * num_slots + slot
        num_shards = dataset.world_size * num_slots
        self.streams = [
            _DomainStream(name, src, shard, num_shards, dataset.seed, mp)
            for name, src, mp in zip(dataset.domains, dataset.sources, dataset.max_passes)
        ]
        if dataset.plans is not None:
            for stream, work in zip(self.streams, dataset.plans[shard]):
                stream.work = work
                stream.epoch, stream.position = work.start()
        self.active = np.ones(dataset.num_domains, dtype=bool)
        self._num_active = dataset.num_domains  # mirrors active.sum(): checked on every batch
        self._active_row = [1] * dataset.num_domains  # mirrors active, as the ints of the stream row
        # k: this slot's next batch is global batch k * num_slots + slot (the first one at or after `start`).
        self.local_batch = max(0, (start - slot + num_slots - 1) // num_slots)
        self.finished = False
        # One key per (seed, rank, slot); the batch index is the Philox counter (set per batch in _generator).
        key = np.random.SeedSequence([dataset.seed, dataset.rank, slot, 0x0D1]).generate_state(2, np.uint64)
        self._bitgen = np.random.Philox(key=key)
        self._gen = np.random.Generator(self._bitgen)
        self._bitgen_state = self._bitgen.state
        self._cdf_key: tuple[bytes, int] = (b"", -1)
        self._cdf = np.ones(dataset.num_domains)
        self._arange = np.arange(dataset.batch_size)
        self._row: tuple[np.ndarray, int] = (np.ones(dataset.num_domains), 0)
        self._row_count = -1  # the schedule's row count when self._row was the newest row, else -1
        # Streams whose source takes state snapshots: their columns end the row, in domain order.
        self._snapshotting = [s for s in self.streams if s.width]
        for s in self._snapshotting:
            s.skeletons = dataset.skeletons
        if dataset.start_rows is not None:
            self._load_row(dataset.start_rows[1 + slot].numpy())

    # -- state ------------------------------------------------------------------------------------------------
    def _load_row(self, row: np.ndarray) -> None:
        base = StreamRow.width(self.ds.num_domains)
        state = StreamRow.unpack(row[:base], self.ds.num_domains)
        if state.next_batch == FRESH:  # this slot has not produced a batch yet
            return
        for s, e, pos in zip(self.streams, state.epochs, state.positions):
            s.epoch, s.position, s._it = e, pos, None
        tail = [int(v) for v in row[base:]]
        for s in self._snapshotting:
            s.snap, tail = (tail[: s.width] if tail[0] >= 0 else None), tail[s.width :]
        self.active = np.asarray(state.active, dtype=bool)
        self._num_active = int(self.active.sum())
        self._active_row = self.active.astype(int).tolist()

    def state(self, next_batch: int) -> StreamRow:
        """This slot's stream state before global batch ``next_batch``."""
        streams = self.streams
        return StreamRow(
            next_batch, [s.epoch for s in streams], [s.position for s in streams], self.active.astype(int).tolist()
        )

    def state_row(self, next_batch: int) -> list[int]:
        """This slot's stream state as one flat row: ``self.state(next_batch).pack()``, built directly (it
        travels with every batch), then the snapshot columns of the sources that take them."""
        streams = self.streams
        row = [next_batch, *[s.epoch for s in streams], *[s.position for s in streams], *self._active_row]
        for s in self._snapshotting:
            row += s.snapshot()
        return row

    # -- iteration -------------------------------------------------------------------------------------------
    def __iter__(self) -> MixtureIterator:
        return self

    def __next__(self) -> dict[str, Any]:
        if self.finished:
            raise StopIteration
        b = self.local_batch * self.num_slots + self.slot
        try:
            samples, ids = self._make(b)
        except _Exhausted:
            self.finished = True
            raise StopIteration from None
        self.local_batch += 1
        try:
            batch = self.ds.collate_fn(samples)
        except Exception as err:
            raise self._collate_error(b, samples, ids, err) from err
        attach = self.ds.attach_state
        # NOTE: under MixtureLoader the ids travel as numpy and become a tensor in the main process: a torch
        # tensor sent from a worker gets its own shared-memory segment (~1 ms per batch for 64 ids).
        domain = ids if attach else torch.from_numpy(ids)
        if type(batch) is not list and isinstance(batch, Mapping):  # (the type test skips the slow ABC check)
            batch = dict(batch)
            if "domain" in batch or "mix_step" in batch:
                raise ValueError("samples must not carry the keys 'domain' or 'mix_step': odm adds them")
            batch["domain"] = domain
            batch["mix_step"] = b
        else:
            batch = {"data": batch, "domain": domain, "mix_step": b}
        if attach:
            batch[STATE_KEY] = {"slot": self.slot, "row": self.state_row(b + 1)}
            if self._snapshotting:
                batch[STATE_KEY]["skeletons"] = fresh_skeletons(self._snapshotting)
        return batch

    def _collate_error(self, b: int, samples: list[Any], ids: np.ndarray, err: Exception) -> Exception:
        """The collate error of batch ``b``, naming each domain in it and the structure of its first sample."""
        names = self.ds.domains
        firsts: dict[int, Any] = {}
        for d, sample in zip(ids.tolist(), samples):
            firsts.setdefault(d, sample)
        described = "; ".join(f"{names[d]!r}: {_describe(x)}" for d, x in sorted(firsts.items()))
        if len(firsts) > 1:
            fix = "give every domain samples of the same structure and shape, or a `collate_fn` that pads"
        else:
            fix = "pass a `collate_fn` that handles these samples"
        message = (
            f"collating batch {b} failed ({type(err).__name__}: {err}); it mixes {len(firsts)} domain(s), the "
            f"first sample of each: {described}; {fix}"
        )
        return type(err)(message) if _rebuildable(err) else RuntimeError(message)

    def _proportions(self, p: np.ndarray) -> np.ndarray:
        if self._num_active == len(p):
            return p
        q = np.where(self.active, p, 0.0)
        if q.sum() <= 0:  # every domain with mass is gone: spread over what remains
            q = self.active.astype(np.float64)
        return q

    def _generator(self, b: int) -> np.random.Generator:
        """The generator of batch ``b``: Philox with this slot's key and counter ``(0, b, 0, 0)``.

        NOTE: the batch index goes in the counter's second word: Philox advances the first word as it
        generates, so ``counter=b`` would make batch b+1 reuse most of batch b's uniforms. Resetting the state
        of one bit generator is ~4x cheaper than building a new one per batch.
        """
        state = self._bitgen_state
        state["state"]["counter"][:] = (0, b, 0, 0)
        state["buffer_pos"] = 4  # discard any buffered output
        state["has_uint32"] = 0
        self._bitgen.state = state
        return self._gen

    def _lookup(self, b: int) -> tuple[np.ndarray, int]:
        """The schedule row in force for batch ``b`` as ``(proportions, mode)``.

        NOTE: the newest row applies to every later batch until the next publish, so while the row count is
        unchanged a batch after one that found the newest row reuses it (one shared-memory read instead of a
        scan and a copy). Rows are only appended, and an iterator never goes back.
        """
        schedule = self.ds.schedule
        count = schedule.num_rows
        if count == self._row_count:
            return self._row
        p, mode, i = schedule.lookup(b)
        self._row = (p, mode)
        self._row_count = count if i == count - 1 else -1
        return self._row

    def _make(self, b: int) -> tuple[list[Any], np.ndarray]:
        if not self._num_active:
            raise _Exhausted
        p, mode = self._lookup(b)
        gen = self._generator(b)
        bs = self.ds.batch_size
        q = self._proportions(p)
        if self.ds.granularity == "batch":
            ids = np.full(bs, inverse_cdf(gen.random(1), q)[0], dtype=np.int64)
        elif mode == MODE_EXACT:
            counts = largest_remainder(q / q.sum(), bs)
            ids = gen.permutation(np.repeat(np.arange(len(q), dtype=np.int64), counts))
        else:
            # The CDF changes only with the schedule row (or when a domain drops): reuse it between batches.
            key = (p.tobytes(), self._num_active)
            if key != self._cdf_key:
                self._cdf_key, self._cdf = key, np.cumsum(q)
            ids = inverse_cdf(gen.random(bs), q, cdf=self._cdf)
        return self._fill(ids, gen, p)

    def _fill(self, ids: np.ndarray, gen: np.random.Generator, p: np.ndarray) -> tuple[list[Any], np.ndarray]:
        """Pulls the samples for ``ids``, redrawing the positions of domains that drop out on the way.

        When every domain is spent mid-batch, the batch is returned short (no sample is lost); an empty batch
        ends the iteration.
        """
        counts = np.bincount(ids, minlength=self.ds.num_domains).tolist()
        # Fast path: every domain's items in domain order into one list, then scattered back to the drawn order.
        flat: list[Any] = []
        extend = flat.extend
        streams = self.streams
        for d, c in enumerate(counts):
            if not c:
                continue
            # _DomainStream.extend, inlined: this loop runs K times per batch.
            stream = streams[d]
            it = stream._it if stream._it is not None else stream.iterator()
            before = len(flat)
            try:
                extend(islice(it, c))
            except Exception as err:
                raise stream.error(err, stream.position + len(flat) - before) from err
            got = len(flat) - before
            stream.position += got
            if got < c:
                return self._fill_short(ids, gen, p, counts, flat, d)
        n = len(ids)
        if n != len(self._arange):
            self._arange = np.arange(n)
        order = np.argsort(ids, kind="stable")
        inverse = np.empty_like(order)
        inverse[order] = self._arange
        got = itemgetter(*inverse.tolist())(flat)
        return (list(got) if n > 1 else [got]), ids

    def _fill_short(
        self, ids: np.ndarray, gen: np.random.Generator, p: np.ndarray, counts: list[int], flat: list[Any], short: int
    ) -> tuple[list[Any], np.ndarray]:
        """The slow path of :meth:`_fill`: the pass of domain ``short`` ended inside this batch. ``flat`` holds,
        in domain order, the items of the domains before it and then its items so far."""
        k = self.ds.num_domains
        per_domain: list[list[Any]] = [[] for _ in range(k)]
        at = 0
        for d, c in enumerate(counts):
            if not c:
                continue
            if d < short:  # read in full by the fast path
                per_domain[d], at = flat[at : at + c], at + c
            else:  # the domain whose pass ended (its items so far are the tail of `flat`), then the unread ones
                per_domain[d] = self._take_more(d, flat[at:] if d == short else [], c)
        out: list[Any] = [None] * len(ids)
        missing: list[int] = []
        for d in range(k):
            where = np.flatnonzero(ids == d).tolist()
            for i, item in zip(where, per_domain[d]):
                out[i] = item
            missing.extend(where[len(per_domain[d]) :])
        # Redraw the unfilled positions among the remaining domains.
        while missing:
            if not self._num_active:
                keep = np.ones(len(ids), dtype=bool)
                keep[missing] = False
                if not keep.any():
                    raise _Exhausted
                return [x for x, kept in zip(out, keep) if kept], ids[keep]
            q = self._proportions(p)
            if self.ds.granularity == "batch":
                new = np.full(len(missing), inverse_cdf(gen.random(1), q)[0])
            else:
                new = inverse_cdf(gen.random(len(missing)), q)
            ids[missing] = new
            still: list[int] = []
            for d in np.unique(new):
                pos = [m for m, nd in zip(missing, new) if nd == d]
                items = self._take_more(int(d), [], len(pos))
                for i, item in zip(pos, items):
                    out[i] = item
                still.extend(pos[len(items) :])
            missing = still
        return out, ids

    def _take_more(self, d: int, items: list[Any], n: int) -> list[Any]:
        """Tops ``items`` up to ``n`` items of domain ``d``, crossing pass boundaries as ``exhausted`` says;
        fewer if the domain drops out. Returns ``items`` (extended in place)."""
        stream = self.streams[d]
        stream.extend(items, n - len(items))
        while len(items) < n:  # the current pass of domain d has ended
            if stream.next_in_plan():  # only an item of a resharding plan ended: its next one
                stream.extend(items, n - len(items))
                continue
            if self.ds.exhausted == "stop":
                raise _Exhausted
            if self.ds.exhausted == "restart" and stream.position == 0 and stream.epoch >= 0:
                raise ValueError(
                    f"domain {stream.name!r} has no samples in shard {stream.shard} of {stream.num_shards} "
                    "(rank x worker); give it more samples or use fewer workers or ranks"
                )
            if self.ds.exhausted == "drop" or not stream.next_pass():
                self.active[d] = False
                self._active_row[d] = 0
                self._num_active -= 1
                return items
            stream.extend(items, n - len(items))
        return items


def _describe(sample: Any) -> str:
    """A short description of a sample's structure: type, and shape or length per field."""
    if isinstance(sample, Mapping):
        return "{" + ", ".join(f"{k!r}: {_describe(v)}" for k, v in list(sample.items())[:6]) + "}"
    shape = getattr(sample, "shape", None)
    if shape is not None:
        return f"{type(sample).__name__} of shape {list(shape)}"
    if isinstance(sample, list | tuple):
        return f"{type(sample).__name__} of length {len(sample)}"
    return type(sample).__name__


def _rebuildable(err: Exception) -> bool:
    """Whether ``type(err)(message)`` builds an exception of the same type (true of most built-in errors)."""
    try:
        return isinstance(type(err)("x"), type(err))
    except Exception:
        return False
