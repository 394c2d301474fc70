"""Hugging Face ``datasets`` as first-class sources: imported only when such an object is passed.

:func:`odm.sources.as_source` routes a ``datasets.Dataset`` to :class:`HFDatasetSource` (map-style: a fresh
permutation per pass, O(1) resume) and a ``datasets.IterableDataset`` to :class:`HFIterableSource` (sharded
by its own shards, so each shard of odm reads only its files). ``import odm`` never imports ``datasets``.

Rows: without a format, a ``datasets`` row holds Python lists for sequence columns, and
``torch.utils.data.default_collate`` would *transpose* a batch of equal-length lists (a list of ``L`` tensors
of shape ``[B]`` instead of one ``[B, L]`` tensor). :class:`odm.MixtureDataset` therefore refuses such a
dataset with the default collate and names the fix: ``ds.with_format("torch")``, or a ``collate_fn``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from itertools import islice
from typing import Any

from torch.utils.data._utils import worker as _worker

from odm._checks import check_int
from odm.hf_state import NONE, decode, encode, skeleton_id, why_not_resumable
from odm.source_base import Source, _skip, _WorkerInfoHidden
from odm.sources import MapSource

__all__ = ["HFDatasetSource", "HFIterableSource", "hf_source", "list_columns"]


def list_columns(data: Any) -> list[str]:
    """Columns of a ``datasets`` object whose rows come back as Python lists (no tensor/numpy format set)."""
    import datasets

    fmt = getattr(data, "format", None)  # Dataset: {"type": None | "torch" | ...}
    if isinstance(fmt, dict):
        fmt_type = fmt.get("type")
    else:  # IterableDataset keeps its format in _formatting (None when unformatted)
        fmt_type = getattr(getattr(data, "_formatting", None), "format_type", None)
    if fmt_type not in (None, "python"):
        return []
    kinds = tuple(
        getattr(datasets, n) for n in ("List", "LargeList", "Sequence") if isinstance(getattr(datasets, n, None), type)
    )
    features = getattr(data, "features", None) or {}
    return [name for name, f in features.items() if isinstance(f, (list, *kinds))]


class HFDatasetSource(MapSource):
    """A ``datasets.Dataset`` as a map-style source: each pass a permutation seeded by ``(seed, pass)``,
    shard ``s`` of ``n`` takes every ``n``-th index of it, resume is O(1). Rows are fetched ``CHUNK`` at a
    time with the dataset's ``__getitems__``.

    Args:
        dataset: the ``datasets.Dataset`` (formatted as you like: ``.with_format("torch")`` for tensors).
        shuffle: reorder each pass (default) or read in index order.

    Example:
        >>> import pytest; _ = pytest.importorskip("datasets")  # skipped where `datasets` is not installed
        >>> from datasets import Dataset
        >>> src = HFDatasetSource(Dataset.from_dict({"x": [0, 1, 2, 3]}), shuffle=False)
        >>> [row["x"] for row in src.open(shard=1, num_shards=2, epoch=0, start=0, seed=0)]
        [1, 3]
    """

    #: Rows fetched per ``__getitems__`` call: one Arrow gather for many rows is ~10x cheaper than a row at a time.
    CHUNK = 64

    def __init__(self, dataset: Any, *, shuffle: bool = True) -> None:
        super().__init__(dataset, shuffle=shuffle)

    def open(self, *, shard: int, num_shards: int, epoch: int, start: int, seed: int) -> Iterator[Any]:
        idx = self.indices(shard=shard, num_shards=num_shards, epoch=epoch, seed=seed)[start:].tolist()
        getitems = getattr(self.dataset, "__getitems__", None)
        if getitems is None:
            return map(self.dataset.__getitem__, idx)
        # NOTE: reading ahead is safe: the stream position counts rows consumed, not rows fetched.
        chunks = (getitems(idx[i : i + self.CHUNK]) for i in range(0, len(idx), self.CHUNK))
        return (row for chunk in chunks for row in chunk)


class HFIterableSource(Source):
    """A ``datasets.IterableDataset``, sharded by its own shards (its files or generator arguments), resumed
    through its own ``state_dict()``.

    With at least as many shards as odm's ``rank x worker`` shards, shard ``s`` of ``n`` reads
    ``dataset.shard(num_shards=n, index=s)`` — whole files, nothing else. With fewer (one file, say), every
    shard reads the whole stream and keeps every ``n``-th row (read amplification ``n``: give the dataset more
    shards, e.g. ``Dataset.to_iterable_dataset(num_shards=...)``). The DataLoader worker info is hidden while
    odm pulls (``datasets`` would otherwise split its shards over the workers a second time). Before each pass
    odm calls ``set_epoch(pass)``, so a ``.shuffle(seed=…)`` dataset reshuffles as it would under a plain
    DataLoader, identically in every process.

    Resume: every ``state_every`` rows of its shard the reading worker takes a *snapshot* of the dataset's
    ``state_dict()``; it travels with the batches in the slot's stream row (its integers, see
    :mod:`odm.hf_state`) up to the checkpoint, which therefore holds, per slot, the state after some row
    ``q <= position``. A resume calls ``shard``, ``set_epoch`` and then ``load_state_dict(snapshot)`` — the order
    of a fresh pass — and skips the ``position - q < state_every`` rows after it: for a streamed corpus, no
    re-reading of what was consumed (within a file, ``datasets`` itself may still skip rows: it resumes a
    generator shard by skipping, an Arrow/JSON/Parquet one by whole record batches). Where a snapshot cannot be
    used, the resume skips ``position`` rows of the shard as before (O(position)), never anything less exact:
    a pipeline step whose state does not resume exactly — above all ``.shuffle(buffer_size=…)``, whose buffer
    ``datasets`` does not save (the skip replays it deterministically) — or a table format
    (:func:`odm.hf_state.why_not_resumable`, the reason is in :attr:`no_state_reason`); fewer HF shards than
    odm's (the strided read); a snapshot of another pass, of an unknown skeleton or with too many numbers; a
    checkpoint written before snapshots existed (for a packed loader: before its rows took them). Packed loaders
    (``pack_length``) resume the same way; a slot that carries a document across the cut keeps, for that
    document's domain, a snapshot from before it (the resume reads that document again, and still skips fewer
    than ``state_every`` rows to reach it).

    Args:
        dataset: the ``datasets.IterableDataset``.
        state_every: rows between two snapshots: the most rows a resume skips (a snapshot costs one
            ``state_dict()`` copy).
        state_numbers: integer columns a snapshot may fill (each stream row and the step's all_reduce carry
            ``2 + state_numbers`` numbers per slot for this domain); a state with more integers is not
            snapshotted. A plain or ``.map``-ped dataset needs about 10, a batched ``.map`` about 17.

    Raises:
        ValueError: ``state_every`` or ``state_numbers`` below 1.

    Example:
        >>> import pytest; _ = pytest.importorskip("datasets")  # skipped where `datasets` is not installed
        >>> from datasets import Dataset
        >>> ds = Dataset.from_dict({"x": list(range(6))}).to_iterable_dataset(num_shards=3)
        >>> [row["x"] for row in HFIterableSource(ds).open(shard=1, num_shards=3, epoch=0, start=0, seed=0)]
        [2, 3]
    """

    def __init__(self, dataset: Any, *, state_every: int = 1024, state_numbers: int = 24) -> None:
        self.dataset = dataset
        self.state_every = check_int(state_every, "state_every", low=1)
        self.state_numbers = check_int(state_numbers, "state_numbers", low=1)
        #: Why this dataset resumes by skipping (``None``: through its ``state_dict()``).
        self.no_state_reason = why_not_resumable(dataset)
        self.snapshot_width = 0 if self.no_state_reason else 2 + self.state_numbers

    @property
    def num_hf_shards(self) -> int:
        """The dataset's own number of shards."""
        return int(getattr(self.dataset, "num_shards", None) or self.dataset.n_shards)

    def is_strided(self, num_shards: int) -> bool:
        """Only with fewer of its own shards than odm's (otherwise each odm shard reads whole HF shards)."""
        return self.num_hf_shards < num_shards

    def open(
        self,
        *,
        shard: int,
        num_shards: int,
        epoch: int,
        start: int,
        seed: int,
        snapshot: Sequence[int] | None = None,
        skeletons: Mapping[int, str] | None = None,
    ) -> Iterator[Any]:
        """See :meth:`Source.open`; ``snapshot`` (a stream row's tail for this domain, taken in this pass) and
        ``skeletons`` (``{skeleton id: skeleton}``) let it start from the dataset's saved state."""
        if self.num_hf_shards < num_shards:  # strided: every shard reads the whole stream and keeps its rows
            rows = _WorkerInfoHidden(lambda: self._pass(None, 1, epoch, None))
            return islice(rows, shard + start * num_shards, None, num_shards)
        state = self._usable(snapshot, skeletons, epoch, start)
        it = _SnapshotRows(
            self._pass(shard, num_shards, epoch, state),
            every=self.state_every if self.snapshot_width else 0,
            numbers=self.state_numbers,
        )
        if state is not None:
            assert snapshot is not None
            it.position, it.snapshot = int(snapshot[0]), [int(v) for v in snapshot]
        return _skip(it, start - it.position)

    def _pass(self, shard: int | None, num_shards: int, epoch: int, state: Any) -> Any:
        """The dataset for one pass of one shard, in a fresh pass's order: ``shard``, ``set_epoch``, then the
        saved state."""
        part = self.dataset if shard is None else self.dataset.shard(num_shards=num_shards, index=shard)
        part.set_epoch(epoch)
        if state is not None:
            part.load_state_dict(state)
        return part

    def _usable(
        self, snapshot: Sequence[int] | None, skeletons: Mapping[int, str] | None, epoch: int, start: int
    ) -> Any:
        """The ``datasets`` state a snapshot holds, or ``None`` where it cannot be used (then: skip)."""
        if not self.snapshot_width or snapshot is None or len(snapshot) != self.snapshot_width:
            return None
        position, sid = int(snapshot[0]), int(snapshot[1])
        if position == NONE or not 0 < position <= start or skeletons is None or sid not in skeletons:
            return None
        try:
            state = decode(skeletons[sid], [int(v) for v in snapshot[2:]])
        except (ValueError, StopIteration):
            return None
        # NOTE: `datasets` silently ignores a state of another epoch; such a snapshot would skip too little.
        if not isinstance(state, dict) or state.get("epoch") != epoch:
            return None
        return state

    def size_hint(self) -> int | None:
        info = getattr(self.dataset, "info", None)
        splits = getattr(info, "splits", None)
        split = getattr(self.dataset, "split", None)
        if splits and split is not None and str(split) in splits:
            return int(splits[str(split)].num_examples)
        return None


class _SnapshotRows(Iterator[Any]):
    """The rows of one pass of one shard, with the worker info hidden (as :class:`_WorkerInfoHidden`), counting
    them and taking a snapshot of the dataset's state every ``every`` rows (never when ``every == 0``).

    ``snapshot`` is the newest usable one, ``[position, skeleton id, leaves…]`` padded to ``2 + numbers``, and
    ``previous`` the one before it (taken here; ``None`` after a restore): a packed slot that carries the
    document this shard read last needs a snapshot from before that document, and the newest one may have been
    taken right after it. ``fresh`` holds the skeletons first seen here, until the dataset ships them to the
    main process.
    """

    __slots__ = ("_due", "_it", "_part", "every", "fresh", "numbers", "position", "previous", "snapshot")

    def __init__(self, part: Any, *, every: int, numbers: int) -> None:
        self._part = part
        self._it: Iterator[Any] | None = None
        self.every, self.numbers = every, numbers
        self.position = 0
        self._due = -1  # the position of the next snapshot (-1: none; set on the first pull)
        self.snapshot: list[int] | None = None
        self.previous: list[int] | None = None
        self.fresh: dict[int, str] = {}

    def __next__(self) -> Any:
        it = self._it
        if it is not None and _worker._worker_info is None:  # the main process: nothing to hide
            row = next(it)
        else:
            row = self._pull_hidden()
        self.position += 1
        if self.position == self._due:
            self._take()
            self._due += self.every
        return row

    def _pull_hidden(self) -> Any:
        saved = _worker._worker_info
        _worker._worker_info = None
        try:
            if self._it is None:
                self._it = iter(self._part)  # `datasets` reads the worker info in __iter__
                if self.every:  # the next multiple of `every` after the start
                    self._due = (self.position // self.every + 1) * self.every
            return next(self._it)
        finally:
            _worker._worker_info = saved

    def _take(self) -> None:
        try:
            skeleton, leaves = encode(self._part.state_dict())
        except ValueError:
            return  # keep the older snapshot: a resume skips a little more
        if len(leaves) > self.numbers:
            return
        sid = skeleton_id(skeleton)
        self.fresh.setdefault(sid, skeleton)
        self.previous = self.snapshot
        self.snapshot = [self.position, sid, *leaves, *[0] * (self.numbers - len(leaves))]


def hf_source(data: Any) -> Source:
    """The source for a ``datasets.Dataset`` or ``datasets.IterableDataset``.

    Raises:
        TypeError: an ``IterableDataset`` already split over ranks by ``split_dataset_by_node`` (odm would
            split it again).
    """
    import datasets

    if isinstance(data, datasets.IterableDataset):
        if getattr(data, "_distributed", None) is not None:
            raise TypeError(
                "this IterableDataset is already split over ranks (`split_dataset_by_node`), and odm shards "
                "over ranks x workers itself: each rank would read a part of a part; pass the unsplit dataset"
            )
        return HFIterableSource(data)
    if isinstance(data, datasets.Dataset):
        return HFDatasetSource(data)
    raise TypeError(f"not a Hugging Face dataset: {type(data).__name__}")
