"""Bad input and faults at the data layer: each case asserts the exact outcome (error type and the words that
name the problem and its fix, or the exact data)."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import webdataset as wds

from odm.dataset import MixtureDataset
from odm.sources import IterableSource, ShardedSource, Source, TextSource, WebDatasetSource, as_source

try:
    import datasets
except ImportError:
    datasets = None

needs_hf = pytest.mark.skipif(datasets is None, reason="Hugging Face `datasets` is not installed")


def first_batch(sources: dict[str, Any], **kw: Any) -> dict[str, Any]:
    kw.setdefault("batch_size", 4)
    return next(iter(MixtureDataset(sources, **kw)))


def tar(path: Path, n: int) -> str:
    with wds.TarWriter(str(path)) as sink:
        for i in range(n):
            sink.write({"__key__": f"k{i}", "txt": f"s{i}".encode()})
    return str(path)


def numbers(lo: int, hi: int):
    """A module-level generator function: a picklable source factory via functools.partial."""
    yield from range(lo, hi)


# -- what cannot be a source ----------------------------------------------------------------------------------


@pytest.mark.parametrize("data", [{3, 1, 2}, frozenset({"a", "b"})])
def test_a_set_is_refused_because_its_order_differs_between_processes(data):
    with pytest.raises(TypeError, match=r"'web'.*order depends on each process's hash seed.*`sorted\(the_set\)`"):
        MixtureDataset({"web": data}, batch_size=2)


def test_a_dict_is_refused_instead_of_yielding_its_keys():
    with pytest.raises(TypeError, match=r"iterating it yields its keys; pass `list\(d.values\(\)\)`"):
        MixtureDataset({"web": {"a": 1, "b": 2}}, batch_size=2)


@needs_hf
def test_a_hugging_face_dataset_dict_asks_for_one_split():
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"x": [1]})})
    with pytest.raises(TypeError, match=r"holds several splits \('train'\); pass one of them, e.g. `ds\['train'\]`"):
        as_source(dd, domain="web")


def test_a_generator_object_is_refused_with_a_picklable_fix():
    with pytest.raises(TypeError) as info:
        as_source(numbers(0, 3), domain="web")
    message = str(info.value)
    assert "domain 'web'" in message and "one-shot iterator (generator)" in message
    assert "functools.partial(my_generator, path)" in message and "`lambda: " not in message


def test_a_partial_of_a_generator_function_is_a_source_read_afresh_each_pass():
    ds = MixtureDataset({"a": functools.partial(numbers, 10, 13)}, batch_size=2)
    it = iter(ds)
    assert [x for _ in range(3) for x in next(it)["data"].tolist()] == [10, 11, 12, 10, 11, 12]


def test_a_string_is_refused_and_pointed_to_the_file_sources():
    with pytest.raises(TypeError, match=r"a string is not a source \('web.jsonl'\).*JsonlSource or TextSource"):
        MixtureDataset({"web": "web.jsonl"}, batch_size=2)


def test_a_factory_that_returns_a_non_iterable_names_the_domain():
    with pytest.raises(RuntimeError, match=r"domain 'a' raised TypeError: the source factory .* returned int"):
        first_batch({"a": int})


def test_an_object_whose_shard_method_is_not_the_protocol_is_read_as_a_plain_iterable():
    class Other(list):
        def shard(self, n):  # another meaning of "shard": not (index, count)
            raise AssertionError("must not be called")

    src = as_source(Other([1, 2, 3, 4]))
    assert isinstance(src, IterableSource) and not isinstance(src, ShardedSource)
    assert list(src.open(shard=1, num_shards=2, epoch=0, start=0, seed=0)) == [2, 4]


def test_the_shard_protocol_gets_index_count_and_the_pass():
    calls = []

    class Mine:
        def set_epoch(self, epoch: int) -> None:
            calls.append(("epoch", epoch))

        def shard(self, index: int, count: int) -> list[int]:
            calls.append(("shard", index, count))
            return list(range(index, 10, count))

    src = as_source(Mine())
    assert isinstance(src, ShardedSource)
    assert list(src.open(shard=2, num_shards=3, epoch=4, start=1, seed=0)) == [5, 8]
    assert calls == [("epoch", 4), ("shard", 2, 3)]


# -- webdataset -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("urls", [["pipe:cat /tmp/x.tar"], "pipe:cat /tmp/x-{0..1}.tar"])
def test_pipe_urls_are_refused_without_allow_pipe(urls):
    with pytest.raises(ValueError, match=r"`urls`: 'pipe:cat /tmp/x.*\.tar' is a `pipe:` URL.*`allow_pipe=True`"):
        WebDatasetSource(urls)


def test_pipe_urls_run_when_allowed(tmp_path):
    path = tar(tmp_path / "a.tar", 3)
    src = WebDatasetSource([f"pipe:cat {path}"], allow_pipe=True, decode=True)
    assert [s["txt"] for s in src.open(shard=0, num_shards=1, epoch=0, start=1, seed=0)] == ["s1", "s2"]


@pytest.mark.parametrize(
    "shuffle, error, match",
    [
        (-1, ValueError, r"`shuffle` must be an integer >= 0, got -1"),
        (2.5, TypeError, r"`shuffle` must be an integer >= 0, got 2.5 \(float\)"),
        (True, TypeError, r"`shuffle` must be an integer >= 0, got True \(bool\)"),
    ],
)
def test_a_bad_shuffle_buffer_size_is_refused(tmp_path, shuffle, error, match):
    with pytest.raises(error, match=match):
        WebDatasetSource([tar(tmp_path / "a.tar", 2)], shuffle=shuffle)


def test_numpy_integers_are_accepted_for_webdataset_counts_and_buffer(tmp_path):
    src = WebDatasetSource(
        [tar(tmp_path / "a.tar", 3)], sample_counts=[np.int64(3)], shuffle=np.int64(2), shuffle_shards=False
    )
    assert src.size_hint() == 3 and src.buffer == 2 and isinstance(src.buffer, int)


# -- files ----------------------------------------------------------------------------------------------------


def test_a_text_line_that_is_not_utf8_names_the_file_and_line(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"fine\n\nstill fine\nbad \xff byte\n")
    with pytest.raises(ValueError, match=r"t\.txt: non-empty line 3 is not valid utf-8 .*`encoding=`"):
        list(TextSource(path).open(shard=0, num_shards=1, epoch=0, start=0, seed=0))


def test_a_text_file_that_is_not_utf8_names_the_file_in_per_file_mode(tmp_path):
    path = tmp_path / "doc.txt"
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match=r"doc\.txt: not valid utf-8"):
        list(TextSource(path, per_file=True).open(shard=0, num_shards=1, epoch=0, start=0, seed=0))


def test_an_unknown_encoding_is_refused_at_construction(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("x\n")
    with pytest.raises(ValueError, match=r"`encoding`: 'utf-9' is not a text encoding"):
        TextSource(path, encoding="utf-9")


def test_a_bad_jsonl_line_surfaces_through_the_mixture_naming_domain_file_and_line(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"t": 1}) + "\n{oops\n")
    from odm.sources import JsonlSource

    with pytest.raises(RuntimeError, match=r"domain 'qa' raised ValueError: .*q\.jsonl: non-empty line 2 is not"):
        first_batch({"qa": JsonlSource(path)})


# -- faults while reading -------------------------------------------------------------------------------------


class FailsAt(Source):
    """Yields items until item ``bad`` of the pass, then raises (a corrupt record)."""

    def __init__(self, bad: int) -> None:
        self.bad = bad

    def open(self, *, shard: int, num_shards: int, epoch: int, start: int, seed: int):
        for i in range(start, 100):
            if i == self.bad:
                raise OSError(f"corrupt record {i}")
            yield i


def test_a_source_error_names_the_failing_item_not_the_start_of_the_pull():
    with pytest.raises(RuntimeError, match=r"domain 'a' raised OSError: corrupt record 5 .*item 5 of the shard's"):
        first_batch({"a": FailsAt(5)}, batch_size=8)


def test_a_source_that_fails_to_open_names_its_domain():
    class Broken:
        def shard(self, index: int, count: int) -> list[int]:
            raise FileNotFoundError("bucket gone")

    with pytest.raises(RuntimeError, match=r"domain 'b' raised FileNotFoundError: bucket gone .*item 0"):
        first_batch({"b": Broken()})


def test_a_domain_with_no_samples_in_a_shard_says_so():
    ds = MixtureDataset({"a": [1]}, batch_size=2)
    ds.rank, ds.world_size = 1, 2
    with pytest.raises(ValueError, match=r"domain 'a' has no samples in shard 1 of 2 \(rank x worker\)"):
        next(iter(ds))


# -- collating ------------------------------------------------------------------------------------------------


def test_a_collate_error_between_domains_of_different_shapes_names_them():
    sources = {"short": [torch.zeros(3)] * 8, "long": [torch.zeros(5)] * 8}
    with pytest.raises(
        RuntimeError,
        match=r"collating batch 0 failed .*'short': Tensor of shape \[3\]; 'long': Tensor of shape \[5\]; give every",
    ):
        first_batch(sources, batch_size=8, seed=1)


def test_a_collate_error_inside_one_domain_asks_for_a_collate_fn():
    with pytest.raises(RuntimeError, match=r"mixes 1 domain\(s\).*'a': Tensor of shape \[\d\]; pass a `collate_fn`"):
        first_batch({"a": [torch.zeros(2), torch.zeros(3)] * 4})


@needs_hf
def test_hugging_face_rows_with_python_lists_are_refused_with_the_default_collate():
    ds = datasets.Dataset.from_dict({"ids": [[i, i + 1] for i in range(8)]})
    with pytest.raises(TypeError, match=r"domain 'web'.*columns \['ids'\] as Python lists.*with_format\('torch'\)"):
        MixtureDataset({"web": ds}, batch_size=4)


@needs_hf
def test_hugging_face_rows_in_torch_format_collate_to_one_tensor():
    ds = datasets.Dataset.from_dict({"ids": [[i, i + 1] for i in range(8)]}).with_format("torch")
    batch = first_batch({"web": ds}, batch_size=4)
    assert batch["ids"].shape == (4, 2) and (batch["ids"][:, 1] - batch["ids"][:, 0] == 1).all()


@needs_hf
def test_hugging_face_rows_with_lists_are_accepted_with_a_collate_fn():
    ds = datasets.Dataset.from_dict({"ids": [[i, i + 1] for i in range(8)]})
    batch = first_batch({"web": ds}, batch_size=4, collate_fn=list)
    assert len(batch["data"]) == 4
    assert all(type(r["ids"]) is list and r["ids"][1] == r["ids"][0] + 1 for r in batch["data"])


# -- arguments ------------------------------------------------------------------------------------------------


def test_numpy_integers_are_accepted_for_batch_size_seed_and_max_passes():
    ds = MixtureDataset({"a": [0, 1, 2]}, batch_size=np.int64(2), seed=np.uint32(3), max_passes=np.int64(2))
    assert [x for b in ds for x in b["data"].tolist()] == [0, 1, 2, 0, 1, 2]
    assert type(ds.batch_size) is int and type(ds.seed) is int


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (
            {"batch_size": np.float64(4.0)},
            TypeError,
            r"`batch_size` must be an integer >= 1, got .*4.0\)? \(float64\)",
        ),
        ({"seed": -5}, ValueError, r"`seed` must be an integer >= 0 and <= \S+, got -5"),
        ({"max_passes": {"a": 0}}, ValueError, r"`max_passes` must be an integer >= 1 or None, got 0"),
        ({"granularity": "token"}, ValueError, r"`granularity` must be one of 'sample', 'batch'; got 'token'"),
        ({"exhausted": "loop"}, ValueError, r"`exhausted` must be one of 'restart', 'stop', 'drop'; got 'loop'"),
    ],
)
def test_bad_mixture_arguments_name_the_argument_and_the_value(kwargs, error, match):
    with pytest.raises(error, match=match):
        MixtureDataset({"a": [1, 2]}, **{"batch_size": 2, **kwargs})


@needs_hf
def test_a_hugging_face_iterable_already_split_by_node_is_refused():
    from datasets.distributed import split_dataset_by_node

    ds = datasets.Dataset.from_dict({"x": list(range(8))}).to_iterable_dataset(num_shards=4)
    with pytest.raises(TypeError, match=r"domain 'web'.*already split over ranks \(`split_dataset_by_node`\)"):
        as_source(split_dataset_by_node(ds, rank=0, world_size=2), domain="web")
