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

Refused, with the fix in the message: a one-shot iterator (a generator object), a ``set`` (its order differs
between processes: pass ``sorted(s)``), a ``dict`` (iterating it yields its keys: pass ``list(d.values())``),
a string.
"""

from __future__ import annotations

import inspect
import json
import os
import random
import re
import tarfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch.utils.data
from torch.utils.data._utils import worker as _worker

from odm._checks import check_int

__all__ = [
    "IterableSource",
    "JsonlSource",
    "MapSource",
    "ShardedSource",
    "Source",
    "TextSource",
    "WebDatasetSource",
    "as_source",
]

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
    each ``__iter__`` reshuffles here too, and must then give the same order in every process.

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


def _stride(items: Iterable[Any], gap: int, step: int) -> Iterator[Any]:
    """Drops ``gap`` items, then yields every ``step``-th item."""
    return islice(items, gap, None, step)


# -- webdataset ----------------------------------------------------------------------------------------------

# webdataset's own rule for metadata members (``tar_file_iterator``'s default ``skip_meta``).
_WDS_SKIP_META = re.compile(r"__[^/]*__($|/)")


def _buffer_shuffle(samples: Iterable[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """webdataset's shuffle buffer, deterministic: fill ``size`` samples, then for each new sample emit a
    random buffered one and put the new one in its place; at the end drain the buffer in random order."""
    buf: list[Any] = []
    for sample in samples:
        if len(buf) < size:
            buf.append(sample)
            continue
        j = rng.randrange(size)
        out, buf[j] = buf[j], sample
        yield out
    rng.shuffle(buf)
    yield from buf


class WebDatasetSource(Source):
    """A list of webdataset ``.tar`` shards, read with webdataset's own tar iterators.

    Samples are webdataset sample dicts: ``__key__``, ``__url__`` and one entry per file extension (raw
    ``bytes``, or decoded when ``decode`` is given).

    Sharding: with at least as many tars as shards (``rank x worker``), shard ``s`` reads tars
    ``order[s::n]`` of the pass's tar order and nothing else (no read amplification; shards may differ in
    size by a tar). With fewer tars than shards, every shard reads all tars in pass order and keeps every
    ``n``-th sample (each byte is read ``n`` times; prefer more tars than ``num_workers x world_size``).

    Passes: with ``shuffle_shards`` the tar order of pass ``e`` is a permutation seeded by ``(seed, e)``;
    samples keep their order inside a tar.

    Resume from ``start``: whole tars before the position are skipped by their sample counts, and only the
    remainder of one tar is read and discarded (not decoded). Counts come from ``sample_counts`` when given,
    from an earlier complete read in the same process, or — for local files — from a scan of the tar headers
    (no member data is read; one ``seek`` per member); the counts are cached. For remote URLs without known
    counts, resume reads and discards the skipped samples (O(position)).

    Sample shuffle (``shuffle=n``): each shard's samples of a pass go through a buffer of ``n`` samples (the
    webdataset ``.shuffle(n)`` behaviour: fill, then emit a random buffered sample for each new one, then drain
    in random order), seeded by ``(seed, pass, shard)``. Resume is exact: the shard's pass is replayed through
    the buffer up to ``start`` (reading, not decoding, the samples before it: O(position)).

    Args:
        urls: one path/URL (brace patterns like ``"data-{000..009}.tar"`` are expanded) or a sequence of them;
            local paths must exist. Anything ``webdataset.gopen`` opens (``http://``, ``s3://`` via ``pipe:``…),
            except that ``pipe:`` URLs run a shell command and are refused unless ``allow_pipe=True``.
        decode: ``None`` keeps bytes; ``True`` applies webdataset's default decoders (``.txt`` → ``str``,
            ``.json`` → object, ``.cls`` → ``int``, …); a string (an image spec such as ``"pil"`` or
            ``"torchrgb"``), a handler ``(key, data) -> value | None``, or a list of them builds a
            ``webdataset.autodecode.Decoder`` exactly as ``webdataset.decode(...)`` would.
        shuffle_shards: permute the tar order on every pass.
        sample_counts: optional number of samples in each tar (same order as ``urls``), for O(1) resume over
            remote shards and a cheap :meth:`size_hint`.
        shuffle: size of the sample shuffle buffer (0: samples keep their order inside a tar).
        allow_pipe: accept ``pipe:`` URLs (only for a URL list you trust: each runs as a shell command).

    Raises:
        TypeError: ``urls`` not a path or sequence of paths; a bad ``decode``; a non-integer ``shuffle``.
        ValueError: no urls, a local file that does not exist, a ``pipe:`` URL without ``allow_pipe=True``,
            ``sample_counts`` of the wrong length or negative, a negative ``shuffle``.

    Example:
        >>> import tempfile, webdataset as wds
        >>> tmp = tempfile.mkdtemp()
        >>> with wds.TarWriter(f"{tmp}/a.tar") as w:
        ...     for i in range(3):
        ...         _ = w.write({"__key__": f"{i:03d}", "txt": f"sample {i}"})
        >>> src = WebDatasetSource([f"{tmp}/a.tar"], decode=True)
        >>> [s["txt"] for s in src.open(shard=0, num_shards=1, epoch=0, start=1, seed=0)]
        ['sample 1', 'sample 2']
    """

    def __init__(
        self,
        urls: PathLike | Sequence[PathLike],
        *,
        decode: Any = None,
        shuffle_shards: bool = True,
        sample_counts: Sequence[int] | None = None,
        shuffle: int = 0,
        allow_pipe: bool = False,
    ) -> None:
        if isinstance(urls, str) and "{" in urls:
            import braceexpand

            urls = list(braceexpand.braceexpand(urls))
        self.urls = _check_paths(urls, arg="urls", remote_ok=True)
        if not allow_pipe:
            for url in self.urls:
                if url.startswith("pipe:"):
                    raise ValueError(
                        f"`urls`: {url[:80]!r} is a `pipe:` URL, which webdataset runs as a shell command; pass "
                        "`allow_pipe=True` only if you trust every URL in the list (never for URLs from an "
                        "untrusted config)"
                    )
        self.decoder = self._make_decoder(decode)
        self.buffer = check_int(shuffle, "shuffle", low=0)
        self.shuffles = (bool(shuffle_shards) and len(self.urls) > 1) or self.buffer > 1
        self.shuffle_shards = bool(shuffle_shards)
        self._counts: dict[int, int] = {}
        if sample_counts is not None:
            counts = list(sample_counts)
            if len(counts) != len(self.urls):
                raise ValueError(
                    f"`sample_counts` has {len(counts)} entries but there are {len(self.urls)} urls; give one "
                    "count per tar, in the order of `urls`"
                )
            self._counts = {i: check_int(c, "sample_counts", low=0) for i, c in enumerate(counts)}

    @staticmethod
    def _make_decoder(decode: Any) -> Callable[[dict[str, Any]], dict[str, Any]] | None:
        if decode is None or decode is False:
            return None
        from webdataset import autodecode

        specs = [] if decode is True else (list(decode) if isinstance(decode, list | tuple) else [decode])
        handlers = []
        for spec in specs:
            if isinstance(spec, str):
                try:
                    handlers.append(autodecode.imagehandler(spec))
                except ValueError as err:
                    raise TypeError(f"`decode`: {spec!r} is not a webdataset image spec ({err})") from None
            elif callable(spec):
                handlers.append(spec)
            else:
                raise TypeError(
                    "`decode` must be None, True, an image spec string, a handler `(key, data) -> value | None` "
                    f"or a list of them, got {spec!r}"
                )
        return autodecode.Decoder(handlers)

    # -- counts ----------------------------------------------------------------------------------------------
    def _read_tar(self, i: int) -> Iterator[dict[str, Any]]:
        """All samples of tar ``i`` in order (webdataset's reader); records its count once read to the end."""
        from webdataset import tariterators

        n = 0
        for sample in tariterators.tarfile_samples([{"url": self.urls[i]}]):
            n += 1
            yield sample
        self._counts[i] = n

    def _count(self, i: int) -> int | None:
        """Samples in tar ``i``: cached, or from a header scan for a local file, else None."""
        if i in self._counts:
            return self._counts[i]
        url = self.urls[i]
        if _is_remote(url):
            return None
        from webdataset import tariterators

        # Group the member names exactly as webdataset does while reading, without reading any member data.
        def members() -> Iterator[dict[str, Any]]:
            with tarfile.open(url, mode="r:*") as tf:
                for m in tf:
                    name = m.name
                    if not m.isreg() or _WDS_SKIP_META.match(name):
                        continue
                    if "/" not in name and name.startswith("__") and name.endswith("__"):
                        continue
                    yield {"fname": name, "data": b"", "__url__": url}

        n = sum(1 for _ in tariterators.group_by_keys(members()))
        self._counts[i] = n
        return n

    def size_hint(self) -> int | None:
        """Total samples, from ``sample_counts`` or a header scan of local tars (cached); None if remote."""
        counts = [self._count(i) for i in range(len(self.urls))]
        return None if any(c is None for c in counts) else sum(c for c in counts if c is not None)

    # -- reading ---------------------------------------------------------------------------------------------
    def is_strided(self, num_shards: int) -> bool:
        """Only with fewer tars than shards and no sample buffer (whole tars per shard are not a stride)."""
        return len(self.urls) < num_shards and self.buffer <= 1

    def tar_order(self, *, epoch: int, seed: int) -> list[int]:
        """The order in which pass ``epoch`` reads the tars (indices into ``urls``)."""
        if not self.shuffle_shards or len(self.urls) < 2:
            return list(range(len(self.urls)))
        # Seeded by the run's seed and the pass only: every rank and worker must agree on the order.
        return np.random.default_rng([seed, epoch, 0x7A125]).permutation(len(self.urls)).tolist()

    def open(self, *, shard: int, num_shards: int, epoch: int, start: int, seed: int) -> Iterator[Any]:
        order = self.tar_order(epoch=epoch, seed=seed)
        if len(order) >= num_shards:
            tars, first, step = order[shard::num_shards], 0, 1
        else:
            tars, first, step = order, shard, num_shards
        if self.buffer > 1:
            # The buffer's output depends on everything before it: replay the shard's pass, skip `start`.
            key = np.random.SeedSequence([seed, epoch, shard, num_shards, 0xB0F]).generate_state(1)
            rng = random.Random(int(key[0]))
            samples = _skip(_buffer_shuffle(self._samples(tars, first, step), self.buffer, rng), start)
        else:
            samples = self._samples(tars, first + start * step, step)
        return samples if self.decoder is None else map(self.decoder, samples)

    def _samples(self, tars: list[int], gap: int, step: int) -> Iterator[dict[str, Any]]:
        """Samples of ``tars`` in order: drops ``gap`` samples, then yields every ``step``-th."""
        for i in tars:
            if gap > 0:
                count = self._count(i)
                if count is not None and gap >= count:
                    gap -= count
                    continue
            for sample in self._read_tar(i):
                if gap == 0:
                    yield sample
                    gap = step - 1
                else:
                    gap -= 1


# -- line files ----------------------------------------------------------------------------------------------

#: One byte offset is kept every this many lines: the index costs 8 bytes per 1024 lines, a resume reads
#: fewer than 1024 lines before its position.
INDEX_EVERY = 1024


class _LineFiles(Source):
    """Non-empty lines of several files, in order, sharded by striding over the concatenation.

    Line ``g`` of the concatenation (counting non-empty lines only) goes to shard ``g % n``. Every shard reads
    every file (read amplification ``n``, cheap next to parsing since only its lines are decoded). Resume
    from ``start`` seeks: a sparse index (the byte offset of every ``INDEX_EVERY``-th line and the line count
    of each file) is built by one scan of the files before the position, the first time a resume needs it in
    a process, and cached; later resumes cost one ``seek`` and fewer than ``INDEX_EVERY`` lines.
    """

    def __init__(self, paths: PathLike | Sequence[PathLike], *, arg: str = "paths") -> None:
        self.paths = _check_paths(paths, arg=arg)
        self._index: dict[int, tuple[int, np.ndarray]] = {}

    def _parse(self, line: bytes, path: str, lineno: int) -> Any:
        raise NotImplementedError

    def file_index(self, i: int) -> tuple[int, np.ndarray]:
        """``(number of non-empty lines, byte offset of every INDEX_EVERY-th one)`` of file ``i`` (cached)."""
        if i not in self._index:
            offsets: list[int] = []
            n = pos = 0
            with open(self.paths[i], "rb") as f:
                for line in f:
                    if not line.isspace():
                        if n % INDEX_EVERY == 0:
                            offsets.append(pos)
                        n += 1
                    pos += len(line)
            self._index[i] = (n, np.asarray(offsets, dtype=np.int64))
        return self._index[i]

    def is_strided(self, num_shards: int) -> bool:
        return True

    def size_hint(self) -> int | None:
        """Number of non-empty lines of all files (one scan, cached)."""
        return sum(self.file_index(i)[0] for i in range(len(self.paths)))

    def open(self, *, shard: int, num_shards: int, epoch: int, start: int, seed: int) -> Iterator[Any]:
        return self._lines(shard + start * num_shards, num_shards)

    def _lines(self, gap: int, step: int) -> Iterator[Any]:
        """Parsed non-empty lines of the concatenation: drops ``gap``, then yields every ``step``-th."""
        for i, path in enumerate(self.paths):
            offset, lineno = 0, 0
            if gap >= INDEX_EVERY or i in self._index:
                count, offsets = self.file_index(i)
                if gap >= count:
                    gap -= count
                    continue
                block = gap // INDEX_EVERY
                offset, lineno = int(offsets[block]), block * INDEX_EVERY
                gap -= lineno
            with open(path, "rb") as f:
                f.seek(offset)
                for line in f:
                    if line.isspace() or not line:
                        continue
                    if gap == 0:
                        yield self._parse(line, path, lineno)
                        gap = step - 1
                    else:
                        gap -= 1
                    lineno += 1


class TextSource(_LineFiles):
    """Plain text files: one sample per non-empty line (a ``str`` without its line ending), or one per file.

    Line mode: lines are numbered over the concatenation of ``paths`` (empty and whitespace-only lines are
    skipped); shard ``s`` of ``n`` takes lines ``s, s + n, …``. Resume is O(1) after a one-time scan (see
    the module table). Each pass reads the files in the same order. File mode (``per_file=True``): each file
    is one sample, shard ``s`` takes files ``s, s + n, …``, resume is O(1).

    Args:
        paths: one text file or a sequence of them.
        per_file: one sample per file instead of per line.
        encoding: text encoding.

    Raises:
        TypeError: ``paths`` is not a path or a sequence of paths.
        ValueError: no paths, or a path that does not exist or is not a file.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.txt"
        >>> _ = p.write_text("one\\ntwo\\n\\nthree\\n")
        >>> list(TextSource(p).open(shard=1, num_shards=2, epoch=0, start=0, seed=0))
        ['two']
    """

    def __init__(self, paths: PathLike | Sequence[PathLike], *, per_file: bool = False, encoding: str = "utf-8"):
        import codecs

        try:
            codecs.lookup(encoding)
        except (LookupError, TypeError):
            raise ValueError(f"`encoding`: {encoding!r} is not a text encoding Python knows (e.g. 'utf-8')") from None
        super().__init__(paths)
        self.per_file = per_file
        self.encoding = encoding

    def _parse(self, line: bytes, path: str, lineno: int) -> Any:
        try:
            return line.decode(self.encoding).rstrip("\r\n")
        except UnicodeDecodeError as err:
            raise ValueError(
                f"{path}: non-empty line {lineno + 1} is not valid {self.encoding} ({err}); pass the file's "
                "`encoding=`, or clean the file"
            ) from None

    def _read_file(self, path: str) -> str:
        try:
            return Path(path).read_text(encoding=self.encoding)
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: not valid {self.encoding} ({err}); pass the file's `encoding=`") from None

    def size_hint(self) -> int | None:
        return len(self.paths) if self.per_file else super().size_hint()

    def open(self, *, shard: int, num_shards: int, epoch: int, start: int, seed: int) -> Iterator[Any]:
        if self.per_file:
            return map(self._read_file, self.paths[shard + start * num_shards :: num_shards])
        return super().open(shard=shard, num_shards=num_shards, epoch=epoch, start=start, seed=seed)


class JsonlSource(_LineFiles):
    """JSON-lines files: one sample per non-empty line, the decoded object or its ``field``.

    Sharding, passes and resume as :class:`TextSource` in line mode.

    Args:
        paths: one ``.jsonl`` file or a sequence of them.
        field: keep only this key of each object (e.g. ``"text"``); ``None`` keeps the whole object.

    Raises:
        TypeError: ``paths`` is not a path or a sequence of paths; ``field`` is not a string.
        ValueError: no paths, or a path that does not exist or is not a file. While reading: a line that is
            not JSON, or an object without ``field`` (naming the file and line).

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.jsonl"
        >>> _ = p.write_text('{"text": "a"}\\n{"text": "b"}\\n')
        >>> list(JsonlSource(p, field="text").open(shard=0, num_shards=1, epoch=0, start=1, seed=0))
        ['b']
    """

    def __init__(self, paths: PathLike | Sequence[PathLike], *, field: str | None = None) -> None:
        if field is not None and not isinstance(field, str):
            raise TypeError(f"`field` must be a string (a key of each JSON object) or None, got {field!r}")
        super().__init__(paths)
        self.field = field

    def _parse(self, line: bytes, path: str, lineno: int) -> Any:
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: non-empty line {lineno + 1} is not valid JSON ({err})") from None
        if self.field is None:
            return obj
        try:
            return obj[self.field]
        except (KeyError, TypeError, IndexError):
            raise ValueError(
                f"{path}: non-empty line {lineno + 1} has no field {self.field!r} (got {str(obj)[:80]})"
            ) from None


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
