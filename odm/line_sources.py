"""``TextSource`` and ``JsonlSource``: plain-text and JSON-lines files as per-domain sources, sharded by
striding over their non-empty lines and resumed by seeking through a sparse line index."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from odm.source_base import PathLike, Source, _check_paths

__all__ = ["INDEX_EVERY", "JsonlSource", "TextSource"]

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
