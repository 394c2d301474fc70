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

from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Any

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
    """A ``datasets.IterableDataset``, sharded by its own shards (its files or generator arguments).

    With at least as many shards as odm's ``rank x worker`` shards, shard ``s`` of ``n`` reads
    ``dataset.shard(num_shards=n, index=s)`` — whole files, nothing else. With fewer (one file, say), every
    shard reads the whole stream and keeps every ``n``-th row (read amplification ``n``: give the dataset more
    shards, e.g. ``Dataset.to_iterable_dataset(num_shards=...)``). The DataLoader worker info is hidden while
    odm pulls (``datasets`` would otherwise split its shards over the workers a second time). Before each pass
    odm calls ``set_epoch(pass)``, so a ``.shuffle(seed=…)`` dataset reshuffles as it would under a plain
    DataLoader, identically in every process.

    Resume skips ``start`` rows of the shard (O(position)). ``datasets``' own ``state_dict()`` is not used: it
    is a nested dict that cannot travel in odm's per-slot integer stream state, and setting a position into it
    is not a public operation (arrow-backed datasets ignore an edited ``shard_example_idx``).

    Args:
        dataset: the ``datasets.IterableDataset``.

    Example:
        >>> import pytest; _ = pytest.importorskip("datasets")  # skipped where `datasets` is not installed
        >>> from datasets import Dataset
        >>> ds = Dataset.from_dict({"x": list(range(6))}).to_iterable_dataset(num_shards=3)
        >>> [row["x"] for row in HFIterableSource(ds).open(shard=1, num_shards=3, epoch=0, start=0, seed=0)]
        [2, 3]
    """

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    @property
    def num_hf_shards(self) -> int:
        """The dataset's own number of shards."""
        return int(getattr(self.dataset, "num_shards", None) or self.dataset.n_shards)

    def is_strided(self, num_shards: int) -> bool:
        """Only with fewer of its own shards than odm's (otherwise each odm shard reads whole HF shards)."""
        return self.num_hf_shards < num_shards

    def open(self, *, shard: int, num_shards: int, epoch: int, start: int, seed: int) -> Iterator[Any]:
        own = self.num_hf_shards >= num_shards

        def make() -> Iterable[Any]:
            part = self.dataset.shard(num_shards=num_shards, index=shard) if own else self.dataset
            part.set_epoch(epoch)
            return part

        rows = _WorkerInfoHidden(make)
        if own:
            return _skip(rows, start)
        return islice(rows, shard + start * num_shards, None, num_shards)

    def size_hint(self) -> int | None:
        info = getattr(self.dataset, "info", None)
        splits = getattr(info, "splits", None)
        split = getattr(self.dataset, "split", None)
        if splits and split is not None and str(split) in splits:
            return int(splits[str(split)].num_examples)
        return None


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
