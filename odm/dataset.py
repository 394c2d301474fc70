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
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from itertools import chain, islice
from operator import itemgetter
from typing import Any

import numpy as np
import torch
import torch.utils.data
from torch.utils.data import default_collate

from odm._draw import inverse_cdf as _draw
from odm._draw import largest_remainder
from odm.schedule import MODE_EXACT, ProportionSchedule
from odm.sources import Source, as_source

__all__ = ["EXHAUSTED_MODES", "GRANULARITIES", "MixtureDataset", "largest_remainder"]

GRANULARITIES = ("sample", "batch")
EXHAUSTED_MODES = ("restart", "stop", "drop")
#: Batch key carrying the slot's stream state to :class:`odm.MixtureLoader` (removed before the user sees it).
STATE_KEY = "_odm_state"
_STATE_VERSION = 1


class _Exhausted(Exception):
    """Internal: every domain of this slot's shard is spent (or one is, with ``exhausted="stop"``)."""


class _DomainStream:
    """One domain's stream in one shard: the source plus its explicit position ``(epoch, position)``."""

    __slots__ = ("_it", "epoch", "max_passes", "name", "num_shards", "position", "seed", "shard", "source")

    def __init__(self, name: str, source: Source, shard: int, num_shards: int, seed: int, max_passes: int | None):
        self.name, self.source, self.shard, self.num_shards = name, source, shard, num_shards
        self.seed, self.max_passes = seed, max_passes
        self.epoch = 0
        self.position = 0
        self._it: Iterator[Any] | None = None

    def take(self, n: int) -> list[Any]:
        """Up to ``n`` items of the current pass (fewer only at the end of the pass)."""
        if self._it is None:
            self._it = self.source.open(
                shard=self.shard, num_shards=self.num_shards, epoch=self.epoch, start=self.position, seed=self.seed
            )
        try:
            items = list(islice(self._it, n))
        except Exception as err:
            raise RuntimeError(
                f"the source of domain {self.name!r} raised {type(err).__name__}: {err} "
                f"(shard {self.shard} of {self.num_shards}, pass {self.epoch}, item {self.position})"
            ) from err
        self.position += len(items)
        return items

    def next_pass(self) -> bool:
        """Starts the next pass; False once the repetition budget ``max_passes`` is spent."""
        if self.max_passes is not None and self.epoch + 1 >= self.max_passes:
            return False
        self.epoch += 1
        self.position = 0
        self._it = None
        return True


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
        TypeError: a domain name that is not a string, or a source that is not iterable.
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
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be an integer >= 1, got {batch_size!r}")
        if granularity not in GRANULARITIES:
            raise ValueError(f"`granularity` must be one of {GRANULARITIES}, got {granularity!r}")
        if exhausted not in EXHAUSTED_MODES:
            raise ValueError(f"`exhausted` must be one of {EXHAUSTED_MODES}, got {exhausted!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"`seed` must be a non-negative integer, got {seed!r}")
        self.domains: list[str] = list(sources)
        self.sources: list[Source] = [as_source(s, domain=d) for d, s in sources.items()]
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
        self.rank = 0
        self.world_size = 1
        self.attach_state = False
        # Shared (1 + num_workers, 1 + 3K) int64 block, or None: row 0 holds the next global batch in column 0;
        # row 1 + slot holds that slot's stream state (see MixtureIterator.state_row), -1 when fresh.
        self.resume: torch.Tensor | None = None

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
        for v in values:
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"`max_passes` must be a positive integer (or None), got {v!r}")
        return values

    @property
    def num_domains(self) -> int:
        return len(self.domains)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        start = 0 if self.resume is None else max(0, int(self.resume[0, 0]))
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
        self.active = np.ones(dataset.num_domains, dtype=bool)
        self._num_active = dataset.num_domains  # mirrors active.sum(): checked on every batch
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
        if dataset.resume is not None:
            self._load_row(dataset.resume[1 + slot].numpy())

    # -- state -----------------------------------------------------------------------------------------------
    def _load_row(self, row: np.ndarray) -> None:
        if int(row[0]) < 0:  # this slot has not produced a batch yet: fresh streams
            return
        k = self.ds.num_domains
        epochs, positions, active = row[1 : 1 + k], row[1 + k : 1 + 2 * k], row[1 + 2 * k : 1 + 3 * k]
        for s, e, pos in zip(self.streams, epochs, positions):
            s.epoch, s.position, s._it = int(e), int(pos), None
        self.active = active.astype(bool)
        self._num_active = int(self.active.sum())

    def state_row(self, next_batch: int) -> list[int]:
        """This slot's stream state as one flat row: ``[next_batch, epochs…, positions…, active…]``."""
        return (
            [next_batch]
            + [s.epoch for s in self.streams]
            + [s.position for s in self.streams]
            + self.active.astype(int).tolist()
        )

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
        batch = self.ds.collate_fn(samples)
        # NOTE: under MixtureLoader the ids travel as numpy and become a tensor in the main process: a torch
        # tensor sent from a worker gets its own shared-memory segment (~1 ms per batch for 64 ids).
        domain = ids if self.ds.attach_state else torch.from_numpy(ids)
        if isinstance(batch, Mapping):
            batch = dict(batch)
            if "domain" in batch or "mix_step" in batch:
                raise ValueError("samples must not carry the keys 'domain' or 'mix_step': odm adds them")
        else:
            batch = {"data": batch}
        batch["domain"] = domain
        batch["mix_step"] = b
        if self.ds.attach_state:
            batch[STATE_KEY] = {"slot": self.slot, "row": self.state_row(b + 1)}
        return batch

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

    def _make(self, b: int) -> tuple[list[Any], np.ndarray]:
        if not self._num_active:
            raise _Exhausted
        p, mode, _ = self.ds.schedule.lookup(b)
        gen = self._generator(b)
        bs = self.ds.batch_size
        q = self._proportions(p)
        if self.ds.granularity == "batch":
            ids = np.full(bs, _draw(gen.random(1), q)[0], dtype=np.int64)
        elif mode == MODE_EXACT:
            counts = largest_remainder(q / q.sum(), bs)
            ids = gen.permutation(np.repeat(np.arange(len(q), dtype=np.int64), counts))
        else:
            # The CDF changes only with the schedule row (or when a domain drops): reuse it between batches.
            key = (p.tobytes(), self._num_active)
            if key != self._cdf_key:
                self._cdf_key, self._cdf = key, np.cumsum(q)
            cdf = self._cdf
            ids = np.searchsorted(cdf, gen.random(bs) * cdf[-1], side="right").astype(np.int64, copy=False)
        return self._fill(ids, gen, p)

    def _fill(self, ids: np.ndarray, gen: np.random.Generator, p: np.ndarray) -> tuple[list[Any], np.ndarray]:
        """Pulls the samples for ``ids``, redrawing the positions of domains that drop out on the way.

        When every domain is spent mid-batch, the batch is returned short (no sample is lost); an empty batch
        ends the iteration.
        """
        k = self.ds.num_domains
        per_domain: list[list[Any]] = [[] for _ in range(k)]
        short = False
        streams = self.streams
        for d, c in enumerate(np.bincount(ids, minlength=k).tolist()):
            if c:
                got = per_domain[d] = streams[d].take(c)
                if len(got) < c:  # the pass ended inside this batch
                    self._take_more(d, got, c)
                    short = short or len(got) < c
        if not short:
            # Fast path: concatenate in domain order, then scatter back to the drawn order.
            flat = list(chain.from_iterable(per_domain))
            order = np.argsort(ids, kind="stable")
            inverse = np.empty_like(order)
            inverse[order] = np.arange(len(order))
            got_items = itemgetter(*inverse.tolist())(flat)
            return (list(got_items) if len(ids) > 1 else [got_items]), ids
        # Slow path (a domain dropped mid-batch): redraw the unfilled positions among the remaining domains.
        out: list[Any] = [None] * len(ids)
        missing: list[int] = []
        for d in range(k):
            where = np.flatnonzero(ids == d).tolist()
            for i, item in zip(where, per_domain[d]):
                out[i] = item
            missing.extend(where[len(per_domain[d]) :])
        while missing:
            if not self._num_active:
                keep = np.ones(len(ids), dtype=bool)
                keep[missing] = False
                if not keep.any():
                    raise _Exhausted
                return [x for x, k in zip(out, keep) if k], ids[keep]
            q = self._proportions(p)
            if self.ds.granularity == "batch":
                new = np.full(len(missing), _draw(gen.random(1), q)[0])
            else:
                new = _draw(gen.random(len(missing)), q)
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
        items.extend(stream.take(n - len(items)))
        while len(items) < n:  # the current pass of domain d has ended
            if self.ds.exhausted == "stop":
                raise _Exhausted
            if self.ds.exhausted == "restart" and stream.position == 0:
                raise ValueError(
                    f"domain {stream.name!r} has no samples in shard {stream.shard} of {stream.num_shards} "
                    "(rank x worker); give it more samples or use fewer workers or ranks"
                )
            if self.ds.exhausted == "drop" or not stream.next_pass():
                self.active[d] = False
                self._num_active -= 1
                return items
            items.extend(stream.take(n - len(items)))
        return items
