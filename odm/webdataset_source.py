"""``WebDatasetSource``: webdataset ``.tar`` shards as a per-domain source (read with webdataset's own tar
iterators), with a deterministic sample shuffle buffer that resumes exactly."""

from __future__ import annotations

import random
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from odm._checks import check_int
from odm.source_base import PathLike, Source, _check_paths, _is_remote, _skip

__all__ = ["WebDatasetSource"]


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
        try:
            import webdataset  # noqa: F401  (read lazily below; checked here so the error comes at construction)
        except ImportError as err:
            raise ImportError(
                "WebDatasetSource needs the `webdataset` package: `pip install 'torch-odm[webdataset]'`"
            ) from err
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
