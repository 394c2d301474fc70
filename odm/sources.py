"""Per-domain sources: anything that turns into a shardable, resumable stream of samples.

A :class:`Source` opens one *shard* of one *pass* over its data, starting at a given position. The mixture
dataset keeps the position (pass, items consumed) itself, so a source holds no iteration state and a resume
is just ``open(..., start=position)``. Sources with random access start in O(1); the others skip ``start``
items (documented on each class).

Sharding: shard ``s`` of ``n`` (``s = rank * num_workers + worker``) sees a disjoint part of the data; the
union of the shards is the whole pass.

How each source shards, passes and resumes (``n`` shards):

* :class:`IterableSource`: every ``n``-th item; passes as the iterable gives them; resume skips items.
* :class:`MapSource`: every ``n``-th index of a per-pass permutation seeded by ``(seed, pass)``; O(1) resume.
* :class:`WebDatasetSource`: whole tars per shard (every ``n``-th sample when there are fewer tars than
  shards); tar order permuted per pass; resume skips whole tars by their sample counts.
* :class:`JsonlSource`, :class:`TextSource`: every ``n``-th non-empty line of the concatenated files; same
  order every pass; resume seeks through a sparse line index (O(1) after one scan).
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch.utils.data

__all__ = [
    "IterableSource",
    "JsonlSource",
    "MapSource",
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
            raise TypeError(f"a source must be iterable, a map-style dataset or a callable, got {type(data).__name__}")
        self.data = data

    def _iterate(self) -> Iterator[Any]:
        if isinstance(self.data, Iterable):
            return iter(self.data)
        out = self.data()
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

    Args:
        urls: one path/URL (brace patterns like ``"data-{000..009}.tar"`` are expanded) or a sequence of them;
            local paths must exist. Anything ``webdataset.gopen`` opens is allowed (``pipe:``, ``http://``, …).
        decode: ``None`` keeps bytes; ``True`` applies webdataset's default decoders (``.txt`` → ``str``,
            ``.json`` → object, ``.cls`` → ``int``, …); a string (an image spec such as ``"pil"`` or
            ``"torchrgb"``), a handler ``(key, data) -> value | None``, or a list of them builds a
            ``webdataset.autodecode.Decoder`` exactly as ``webdataset.decode(...)`` would.
        shuffle_shards: permute the tar order on every pass.
        sample_counts: optional number of samples in each tar (same order as ``urls``), for O(1) resume over
            remote shards and a cheap :meth:`size_hint`.

    Raises:
        TypeError: ``urls`` not a path or sequence of paths; a bad ``decode``.
        ValueError: no urls, a local file that does not exist, ``sample_counts`` of the wrong length or
            negative.

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
    ) -> None:
        if isinstance(urls, str) and "{" in urls:
            import braceexpand

            urls = list(braceexpand.braceexpand(urls))
        self.urls = _check_paths(urls, arg="urls", remote_ok=True)
        self.decoder = self._make_decoder(decode)
        self.shuffles = bool(shuffle_shards) and len(self.urls) > 1
        self._counts: dict[int, int] = {}
        if sample_counts is not None:
            counts = list(sample_counts)
            if len(counts) != len(self.urls):
                raise ValueError(
                    f"`sample_counts` has {len(counts)} entries but there are {len(self.urls)} urls; give one "
                    "count per tar, in the order of `urls`"
                )
            for c in counts:
                if isinstance(c, bool) or not isinstance(c, int | np.integer) or c < 0:
                    raise ValueError(f"`sample_counts` must hold non-negative integers, got {c!r}")
            self._counts = {i: int(c) for i, c in enumerate(counts)}

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
    def tar_order(self, *, epoch: int, seed: int) -> list[int]:
        """The order in which pass ``epoch`` reads the tars (indices into ``urls``)."""
        if not self.shuffles:
            return list(range(len(self.urls)))
        return np.random.default_rng([seed, epoch, 0x7A125]).permutation(len(self.urls)).tolist()

    def open(self, *, shard: int, num_shards: int, epoch: int, start: int, seed: int) -> Iterator[Any]:
        order = self.tar_order(epoch=epoch, seed=seed)
        if len(order) >= num_shards:
            tars, gap, step = order[shard::num_shards], start, 1
        else:
            tars, gap, step = order, shard + start * num_shards, num_shards
        samples = self._samples(tars, gap, step)
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
        super().__init__(paths)
        self.per_file = per_file
        self.encoding = encoding

    def _parse(self, line: bytes, path: str, lineno: int) -> Any:
        return line.decode(self.encoding).rstrip("\r\n")

    def size_hint(self) -> int | None:
        return len(self.paths) if self.per_file else super().size_hint()

    def open(self, *, shard: int, num_shards: int, epoch: int, start: int, seed: int) -> Iterator[Any]:
        if self.per_file:
            return (
                Path(p).read_text(encoding=self.encoding) for p in self.paths[shard + start * num_shards :: num_shards]
            )
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
