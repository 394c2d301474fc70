"""Per-domain sources: anything that turns into a shardable, resumable stream of samples.

A :class:`Source` opens one *shard* of one *pass* over its data, starting at a given position. The mixture
dataset keeps the position (pass, items consumed) itself, so a source holds no iteration state and a resume
is just ``open(..., start=position)``. Sources with random access start in O(1); the others skip ``start``
items (documented on each class).

Sharding: shard ``s`` of ``n`` (``s = rank * num_workers + worker``) sees a disjoint part of the data; the
union of the shards is the whole pass.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import islice
from typing import Any

import numpy as np
import torch.utils.data

__all__ = ["IterableSource", "MapSource", "Source", "as_source"]


class Source(ABC):
    """A per-domain stream that can be sharded and resumed.

    Subclasses implement :meth:`open`. ``shuffles`` says whether a new pass reorders the data.
    """

    #: Whether each pass reorders the data (seeded by ``(seed, epoch)``).
    shuffles: bool = False

    @abstractmethod
    def open(self, *, shard: int, num_shards: int, epoch: int, start: int, seed: int) -> Iterator[Any]:
        """Returns an iterator over shard ``shard`` of ``num_shards`` of pass ``epoch``, from item ``start``.

        ``start`` counts items of this shard's pass already consumed. ``seed`` seeds any shuffling (the same
        on every rank and worker, so shards stay disjoint).
        """

    def size_hint(self) -> int | None:
        """Number of samples in one pass over the whole source, if known cheaply (for ``Natural``)."""
        return None


class IterableSource(Source):
    """Any re-iterable (a list, an ``IterableDataset``, …) or a zero-argument callable returning an iterator.

    Sharding takes every ``num_shards``-th item (each shard reads the whole stream and keeps its part). Resume
    skips ``start`` items of the shard: O(position). Passes repeat the stream as it comes; an ``IterableDataset``
    that reshuffles on each ``__iter__`` reshuffles here too.

    Args:
        data: a re-iterable object or a factory callable.

    Raises:
        TypeError: for a one-shot iterator (a generator object, ``iter(x)``): it cannot restart or be read by
            several workers. Pass the list, the dataset, or a function that builds the generator.
    """

    def __init__(self, data: Iterable[Any] | Callable[[], Iterable[Any]]) -> None:
        if isinstance(data, str | bytes):
            raise TypeError(
                f"a string is not a source ({data[:60]!r}); for files use odm.sources.JsonlSource or TextSource"
            )
        if isinstance(data, Iterator):
            raise TypeError(
                f"a one-shot iterator ({type(data).__name__}) cannot be a source: it cannot restart a pass, "
                "be resumed, or be shared by DataLoader workers; pass a list, a dataset, or a zero-argument "
                "function that returns a fresh iterator (e.g. `lambda: my_generator()`)"
            )
        if not (callable(data) or isinstance(data, Iterable)):
            raise TypeError(
                f"a source must be iterable, a map-style dataset or a callable, got {type(data).__name__}"
            )
        self.data = data

    def _iterate(self) -> Iterator[Any]:
        if isinstance(self.data, Iterable):
            return iter(self.data)
        out = self.data()  # type: ignore[operator]
        return iter(out)

    def open(self, *, shard: int, num_shards: int, epoch: int, start: int, seed: int) -> Iterator[Any]:
        return islice(self._iterate(), shard + start * num_shards, None, num_shards)

    def size_hint(self) -> int | None:
        try:
            return len(self.data)  # type: ignore[arg-type]
        except TypeError:
            return None


class MapSource(Source):
    """A map-style dataset (``__len__`` + ``__getitem__``), shuffled afresh on each pass.

    Each pass permutes the indices with a generator seeded by ``(seed, epoch)``; shard ``s`` takes every
    ``n``-th index of the permutation. Resume is O(1): it starts at index ``start`` of the shard.

    Args:
        dataset: the map-style dataset.
        shuffle: reorder each pass (default) or read in index order.
    """

    def __init__(self, dataset: Any, *, shuffle: bool = True) -> None:
        if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
            raise TypeError(f"MapSource needs __len__ and __getitem__, got {type(dataset).__name__}")
        self.dataset = dataset
        self.shuffles = shuffle

    def indices(self, *, shard: int, num_shards: int, epoch: int, seed: int) -> np.ndarray:
        n = len(self.dataset)
        if self.shuffles:
            order = np.random.default_rng([seed, epoch, 0x5EED]).permutation(n)
        else:
            order = np.arange(n)
        return order[shard::num_shards]

    def open(self, *, shard: int, num_shards: int, epoch: int, start: int, seed: int) -> Iterator[Any]:
        idx = self.indices(shard=shard, num_shards=num_shards, epoch=epoch, seed=seed)
        getitem = self.dataset.__getitem__
        return (getitem(int(i)) for i in idx[start:])

    def size_hint(self) -> int | None:
        return len(self.dataset)


def as_source(data: Any, *, domain: str = "?") -> Source:
    """Turns ``data`` into a :class:`Source`.

    A :class:`Source` is returned as is; a map-style dataset (``__len__`` + ``__getitem__``, not an
    ``IterableDataset``, not a plain list or tuple) becomes a :class:`MapSource`; anything else iterable or
    callable becomes an :class:`IterableSource`.

    Raises:
        TypeError: naming the domain, for something that is none of these.
    """
    if isinstance(data, Source):
        return data
    try:
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
