"""Per-domain sources: anything that turns into a shardable, resumable stream of samples.

A :class:`Source` opens one *shard* of one *pass* over its data, starting at a given position. The mixture
dataset keeps the position (pass, items consumed) itself, so a source holds no iteration state and a resume
is just ``open(..., start=position)``. Sources with random access start in O(1); the others skip ``start``
items (documented on each class).

The sharding contract: a source is sharded *either* by odm *or* by itself, never both. Shard ``s`` of ``n``
(``s = rank * num_workers + slot``, see :mod:`odm.dataset`) sees a disjoint part of each pass and the union of
the ``n`` shards is the whole pass, so every sample is read exactly once per pass across workers and ranks.
Everything that decides a pass's order (a permutation, the tar order) is seeded by the run's ``seed`` and the
pass only, never by the rank: a per-rank seed would permute each rank's data differently and break the
disjointness (the loader refuses ranks whose seeds differ at its first collective).

How each source shards, passes and resumes (``n`` shards):

* list / tuple / ``range`` (:class:`IterableSource`): items ``s, s + n, …`` by slicing; same order every
  pass; O(1) resume.
* any other iterable, torch ``IterableDataset`` or zero-argument callable (:class:`IterableSource`): odm
  shards it, taking every ``n``-th item; the DataLoader worker info is *hidden* while odm pulls from it, so a
  dataset that splits itself with ``get_worker_info()`` (the torch docs' pattern) yields everything and is not
  split twice; resume skips items.
* an object with a ``shard(index, count)`` method (:class:`ShardedSource`): it shards itself; odm calls
  ``shard(index=s, count=n)`` and ``set_epoch(pass)`` when present; resume skips items of the shard.
* map-style dataset (:class:`MapSource`): every ``n``-th index of a per-pass permutation seeded by
  ``(seed, pass)``; O(1) resume.
* Hugging Face ``datasets.Dataset`` / ``IterableDataset``: see :mod:`odm.hf_sources` (map-style; or sharded
  by their own shards and resumed through their own ``state_dict()``).
* :class:`WebDatasetSource`: whole tars per shard (every ``n``-th sample when there are fewer tars than
  shards); tar order permuted per pass; resume skips whole tars by their sample counts; optional sample
  shuffle buffer (``shuffle=n``, resumed exactly by replaying the buffer).
* :class:`JsonlSource`, :class:`TextSource`: every ``n``-th non-empty line of the concatenated files; same
  order every pass; resume seeks through a sparse line index (O(1) after one scan).

Most sources are *strided* (:meth:`Source.is_strided`): shard ``s`` of ``n`` reads items ``s, s + n, …`` of
one pass order that depends only on ``(seed, pass)``, so a stream position means the same set of samples on
any topology. Whole-file sharding (webdataset tars, Hugging Face shards, when there are at least ``n``) and
self-sharding objects are not.

Modules: this one holds the contract, the in-memory and map-style sources and :func:`as_source`; the
protocol itself is in :mod:`odm.source_base`, :class:`WebDatasetSource` in :mod:`odm.webdataset_source`,
:class:`TextSource` and :class:`JsonlSource` in :mod:`odm.line_sources` (all importable from here).

Refused, with the fix in the message: a one-shot iterator (a generator object), a ``set`` (its order differs
between processes: pass ``sorted(s)``), a ``dict`` (iterating it yields its keys: pass ``list(d.values())``),
a string.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from itertools import islice
from typing import Any

import numpy as np
import torch.utils.data

from odm.line_sources import INDEX_EVERY, JsonlSource, TextSource
from odm.source_base import PathLike, Source, _skip, _WorkerInfoHidden
from odm.webdataset_source import WebDatasetSource

__all__ = [
    "INDEX_EVERY",
    "IterableSource",
    "JsonlSource",
    "MapSource",
    "PathLike",
    "ShardedSource",
    "Source",
    "TextSource",
    "WebDatasetSource",
    "as_source",
    "source_sizes",
]


# -- in-memory and Python iterables --------------------------------------------------------------------------

_SLICEABLE = (list, tuple, range, np.ndarray)


def _refuse(data: Any) -> None:
    """Raises the TypeError, with its fix, for what cannot be a source."""
    if isinstance(data, str | bytes):
        raise TypeError(
            f"a string is not a source ({data[:60]!r}); for files use odm.sources.JsonlSource or TextSource"
        )
    if isinstance(data, set | frozenset):
        raise TypeError(
            f"a {type(data).__name__} cannot be a source: its order depends on each process's hash seed, so "
            "DataLoader workers started with spawn (and other ranks) disagree on it and read some samples twice "
            "and others never; pass `sorted(the_set)` (or a list)"
        )
    if isinstance(data, Mapping) and not isinstance(data, torch.utils.data.Dataset):
        what = type(data).__name__
        if what in ("DatasetDict", "IterableDatasetDict"):
            raise TypeError(
                f"a {what} holds several splits ({', '.join(map(repr, list(data)[:5]))}); pass one of them, "
                "e.g. `ds['train']`"
            )
        raise TypeError(
            f"a {what} cannot be a source: iterating it yields its keys; pass `list(d.values())` for its values, "
            "`list(d.items())` for pairs, or one source per domain in the `sources` mapping"
        )
    if isinstance(data, Iterator):
        raise TypeError(
            f"a one-shot iterator ({type(data).__name__}) cannot be a source: it cannot restart a pass, be "
            "resumed, or be shared by DataLoader workers; pass a list, a dataset, or a picklable zero-argument "
            "callable that returns a fresh iterator: a module-level generator function (`my_generator`, not "
            "`my_generator()`) or `functools.partial(my_generator, path)` (a lambda or a nested function "
            "cannot be pickled for spawn workers)"
        )


class IterableSource(Source):
    """Any re-iterable (a list, an ``IterableDataset``, …) or a zero-argument callable returning an iterator.

    odm shards it. A list, tuple or ``range`` is sliced: shard ``s`` of ``n`` reads items ``s, s + n, …``,
    and resume is O(1). Anything else is read whole by every shard, which keeps every ``n``-th item; resume
    skips ``start`` items of the shard (O(position)). While odm pulls from it, ``get_worker_info()`` returns
    ``None``, so a torch ``IterableDataset`` that splits itself across DataLoader workers yields everything
    and is not split twice (to let a dataset shard itself, give it a ``shard(index, count)`` method: see
    :class:`ShardedSource`). Passes repeat the stream as it comes; an ``IterableDataset`` that reshuffles on
    each ``__iter__`` reshuffles here too, and must then give the same order in every process. A dataset that
    splits itself over ranks (reading ``torch.distributed.get_rank()``) must use the ``shard(index, count)``
    protocol instead: odm cannot hide the rank, and would split it a second time.

    Args:
        data: a re-iterable object or a zero-argument callable (picklable for spawn workers: a module-level
            function or a ``functools.partial``).

    Raises:
        TypeError: for a one-shot iterator (a generator object, ``iter(x)``), a ``set``, a ``dict`` or a
            string, each with the fix.

    Example:
        >>> [list(IterableSource(range(10)).open(shard=s, num_shards=3, epoch=0, start=1, seed=0)) for s in (0, 1)]
        [[3, 6, 9], [4, 7]]
    """

    def __init__(self, data: Iterable[Any] | Callable[[], Iterable[Any]]) -> None:
        _refuse(data)
        if not (callable(data) or isinstance(data, Iterable)):
            raise TypeError(f"a source must be iterable, a map-style dataset or a callable, got {type(data).__name__}")
        self.data = data

    def _iterate(self) -> Iterable[Any]:
        if isinstance(self.data, Iterable):
            return self.data
        out = self.data()
        _refuse_output(out, self.data)
        return out

    def is_strided(self, num_shards: int) -> bool:
        return True

    def open(self, *, shard: int, num_shards: int, epoch: int, start: int, seed: int) -> Iterator[Any]:
        first = shard + start * num_shards
        if isinstance(self.data, _SLICEABLE):
            return iter(self.data[first::num_shards])
        return islice(_WorkerInfoHidden(self._iterate), first, None, num_shards)

    def size_hint(self) -> int | None:
        try:
            return len(self.data)  # type: ignore[arg-type]
        except TypeError:
            return None


def _refuse_output(out: Any, factory: Any) -> None:
    if not isinstance(out, Iterable):
        raise TypeError(f"the source factory {factory!r} returned {type(out).__name__}, which is not iterable")


class ShardedSource(Source):
    """A dataset that shards itself: ``data.shard(index=s, count=n)`` returns the iterable of shard ``s``.

    odm never strides over it. Before each pass it calls ``data.set_epoch(pass)`` when that method exists
    (the torch / Hugging Face convention for reshuffling). The worker info is hidden while odm pulls, as for
    :class:`IterableSource`: the object must shard by the ``index`` and ``count`` it is given, not by the
    DataLoader worker (odm's shard index is ``rank * num_workers + slot``). Resume skips ``start`` items of
    the shard. :func:`as_source` picks this class for any object whose ``shard`` method takes parameters named
    ``index`` and ``count``.

    Args:
        data: the self-sharding dataset.

    Example:
        >>> class Evens:
        ...     def shard(self, index, count):
        ...         return range(2 * index, 20, 2 * count)
        >>> list(ShardedSource(Evens()).open(shard=1, num_shards=3, epoch=0, start=1, seed=0))
        [8, 14]
    """

    def __init__(self, data: Any) -> None:
        if not callable(getattr(data, "shard", None)):
            raise TypeError(f"ShardedSource needs a `shard(index, count)` method, got {type(data).__name__}")
        self.data = data

    def open(self, *, shard: int, num_shards: int, epoch: int, start: int, seed: int) -> Iterator[Any]:
        def make() -> Iterable[Any]:
            set_epoch = getattr(self.data, "set_epoch", None)
            if callable(set_epoch):
                set_epoch(epoch)
            return self.data.shard(index=shard, count=num_shards)

        return _skip(_WorkerInfoHidden(make), start)

    def size_hint(self) -> int | None:
        try:
            return len(self.data)
        except TypeError:
            return None


def _shards_itself(data: Any) -> bool:
    """Whether ``data.shard`` follows the ``shard(index, count)`` protocol (by its parameter names)."""
    method = getattr(data, "shard", None)
    if not callable(method):
        return False
    try:
        params = inspect.signature(method).parameters
    except (TypeError, ValueError):
        return False
    return "index" in params and "count" in params


class MapSource(Source):
    """A map-style dataset (``__len__`` + ``__getitem__``), shuffled afresh on each pass.

    Each pass permutes the indices with a generator seeded by ``(seed, epoch)`` only (never the rank: every
    rank and worker must compute the same permutation); shard ``s`` takes every ``n``-th index of it. Resume
    is O(1): it starts at index ``start`` of the shard.

    Args:
        dataset: the map-style dataset.
        shuffle: reorder each pass (default) or read in index order.

    Example:
        >>> src = MapSource(list("abcdef"), shuffle=False)
        >>> list(src.open(shard=1, num_shards=2, epoch=0, start=1, seed=0))
        ['d', 'f']
    """

    def __init__(self, dataset: Any, *, shuffle: bool = True) -> None:
        if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
            raise TypeError(f"MapSource needs __len__ and __getitem__, got {type(dataset).__name__}")
        self.dataset = dataset
        self.shuffles = bool(shuffle)

    def pass_order(self, *, epoch: int, seed: int) -> np.ndarray:
        """The indices of pass ``epoch`` in reading order, before sharding (the same in every process)."""
        n = len(self.dataset)
        if self.shuffles:
            return np.random.default_rng([seed, epoch, 0x5EED]).permutation(n)
        return np.arange(n)

    def is_strided(self, num_shards: int) -> bool:
        return True

    def indices(self, *, shard: int, num_shards: int, epoch: int, seed: int) -> np.ndarray:
        """The indices shard ``shard`` of ``num_shards`` reads in pass ``epoch``."""
        return self.pass_order(epoch=epoch, seed=seed)[shard::num_shards]

    def open(self, *, shard: int, num_shards: int, epoch: int, start: int, seed: int) -> Iterator[Any]:
        idx = self.indices(shard=shard, num_shards=num_shards, epoch=epoch, seed=seed)
        getitem = self.dataset.__getitem__
        return map(getitem, idx[start:].tolist())

    def size_hint(self) -> int | None:
        return len(self.dataset)


def _is_hf(data: Any) -> bool:
    """Whether ``data`` is a Hugging Face ``datasets.Dataset`` / ``IterableDataset`` (without importing it)."""
    return any(
        c.__module__.split(".")[0] == "datasets" and c.__name__ in ("Dataset", "IterableDataset")
        for c in type(data).__mro__
    )


def as_source(data: Any, *, domain: str = "?") -> Source:
    """Turns ``data`` into a :class:`Source`, following the sharding contract of the module docstring.

    In order: a :class:`Source` is returned as is; a Hugging Face ``datasets.Dataset`` or
    ``IterableDataset`` gets its adapter from :mod:`odm.hf_sources`; a one-shot iterator, a ``set``, a
    ``dict`` or a string is refused; an object with a ``shard(index, count)`` method becomes a
    :class:`ShardedSource`; a map-style torch ``Dataset`` (``__len__`` + ``__getitem__``, not an
    ``IterableDataset``) a :class:`MapSource`; anything else iterable or callable an :class:`IterableSource`.

    Raises:
        TypeError: naming the domain, for something that is none of these, with the fix.

    Example:
        >>> type(as_source([1, 2, 3])).__name__, type(as_source(range(5))).__name__
        ('IterableSource', 'IterableSource')
    """
    if isinstance(data, Source):
        return data
    try:
        if _is_hf(data):
            from odm.hf_sources import hf_source

            return hf_source(data)
        _refuse(data)
        if _shards_itself(data):
            return ShardedSource(data)
        if (
            isinstance(data, torch.utils.data.Dataset)
            and not isinstance(data, torch.utils.data.IterableDataset)
            and hasattr(data, "__len__")
        ):
            return MapSource(data)
        return IterableSource(data)
    except TypeError as err:
        raise TypeError(f"source of domain {domain!r}: {err}") from None


def source_sizes(sources: Sequence[Source]) -> list[int | None]:
    """``size_hint()`` of each source (``None`` where unknown)."""
    return [s.size_hint() for s in sources]
