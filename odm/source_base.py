"""The :class:`Source` protocol and the helpers every source module shares (odm's own sources live in
:mod:`odm.sources`, which states the sharding contract, and the modules it re-exports from)."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import islice
from typing import Any

from torch.utils.data._utils import worker as _worker

__all__ = ["PathLike", "Source"]

PathLike = str | os.PathLike[str]


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

    def is_strided(self, num_shards: int) -> bool:
        """Whether shard ``s`` of ``num_shards`` reads items ``s, s + n, s + 2n, …`` of one pass order that
        depends only on ``(seed, epoch)`` (the order shard 0 of 1 reads).

        Then a stream position ``p`` of shard ``s`` means exactly the pass's items ``{s + i n : i < p}`` have
        been read, whatever the topology: what a resume on another number of workers or ranks needs.
        """
        return False


# -- worker info ---------------------------------------------------------------------------------------------


class _WorkerInfoHidden(Iterator[Any]):
    """Iterates ``make()`` with ``torch.utils.data.get_worker_info()`` returning ``None`` inside each call.

    NOTE: odm shards such a stream itself (by slot, which is not the DataLoader worker id after a resume); a
    dataset that also split itself by worker info would be split twice and lose samples. torch has no public
    way to hide the worker info, so this swaps the module global that ``get_worker_info()`` returns, around
    each pull only (the rest of the worker still sees its info).
    """

    __slots__ = ("_it", "_make")

    def __init__(self, make: Callable[[], Iterable[Any]]) -> None:
        self._make: Callable[[], Iterable[Any]] | None = make
        self._it: Iterator[Any] | None = None

    def __next__(self) -> Any:
        saved = _worker._worker_info
        if saved is None:  # the main process (num_workers=0): nothing to hide
            return self._pull()
        _worker._worker_info = None
        try:
            return self._pull()
        finally:
            _worker._worker_info = saved

    def _pull(self) -> Any:
        if self._it is None:
            assert self._make is not None
            self._it = iter(self._make())  # some datasets read the worker info in __iter__ itself
            self._make = None
        return next(self._it)


def _skip(it: Iterator[Any], n: int) -> Iterator[Any]:
    """``it`` after dropping ``n`` items (consumed now, so a later error names the right item)."""
    if n:
        next(islice(it, n, n), None)
    return it


# -- files ---------------------------------------------------------------------------------------------------


def _is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def _check_paths(paths: Any, *, arg: str, remote_ok: bool = False) -> list[str]:
    """Validates one path or a non-empty sequence of paths; local ones must be existing files."""
    if isinstance(paths, str | os.PathLike):
        items = [paths]
    elif isinstance(paths, Sequence) and not isinstance(paths, bytes):
        items = list(paths)
    else:
        raise TypeError(f"`{arg}` must be a path or a sequence of paths, got {type(paths).__name__}")
    if not items:
        raise ValueError(f"`{arg}` is empty: give at least one file")
    out = []
    for p in items:
        if not isinstance(p, str | os.PathLike):
            raise TypeError(f"`{arg}` must hold paths (str or os.PathLike), got {p!r} ({type(p).__name__})")
        s = os.fspath(p)
        if remote_ok and _is_remote(s):
            out.append(s)
            continue
        if not os.path.exists(s):
            raise ValueError(f"`{arg}`: no such file {s!r}")
        if not os.path.isfile(s):
            raise ValueError(f"`{arg}`: {s!r} is not a regular file (a directory?); give the files themselves")
        out.append(s)
    return out
