"""Token-level mixing of packed sequences: the proportions are *token* shares.

Pretraining packs documents into rows of ``pack_length`` tokens. Proportions over documents are not proportions
over tokens (with 400- and 4000-token documents the token share is off by 10x), and packing *after* mixing
loses the ratios altogether. :class:`PackedMixtureDataset` therefore packs inside the mixture: for global batch
``b`` it adds ``p_b * B * T`` to a per-domain token *deficit* (``p_b``: the schedule row in force for ``b``) and
fills the batch document by document, each next document coming from the domain with the largest deficit among
those with ``p_b > 0`` (ties to the lowest index). A document that does not fit is cut; its remainder opens the
next row — or the next batch — so no token is dropped and every token keeps its domain.

Why the rule meets the target: after each batch the deficits sum to 0 (exactly ``B * T`` tokens are added and
placed). A domain is only chosen while its deficit is the largest, hence ``>= 0``, and that choice places one
document of at most ``L`` tokens, so every deficit stays ``>= -L`` and therefore ``<= (K - 1) * L``. Over ``N``
batches each domain's realised token count is within ``(K - 1) * L`` of ``Σ_b p_b[k] * B * T``: the token-share
error falls as ``1 / N``. The rule draws no random numbers at all, so a batch is a pure function of the seed
(source shuffling), the shard, the schedule rows and the slot's state; that state — stream positions, deficits
and the partial document being carried — is a short integer row, saved and restored exactly. A source that
snapshots its own state (:class:`odm.hf_sources.HFIterableSource`) adds its snapshot columns to the row, as in
unpacked loaders: a resume reopens it from the snapshot instead of skipping the pass's consumed documents.

Each batch is a dict of tensors:

* ``input_ids`` (``tokens_key``): ``LongTensor[B, T]``;
* ``token_domain``: ``LongTensor[B, T]``, the domain of every token (``-1`` would mark padding; packing with
  restarting passes never pads);
* ``position_ids``: ``LongTensor[B, T]``, restarting at 0 at every *segment* — a document, or the part of one
  that lies in this row (the convention of flash-attention's varlen kernels and Hugging Face's
  ``DataCollatorWithFlattening``);
* ``cu_seqlens``: ``IntTensor[S + 1]``, cumulative segment lengths over the flattened ``B * T`` tokens, with a
  boundary at every row start; ``max_seqlen``: the longest segment;
* ``mix_step``: the global batch index ``b``.

Feed the per-token losses back with ``mixer.observe(batch, per_token_losses)`` (each token's loss credited to
``batch["token_domain"]``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
import torch.utils.data

from odm._checks import check_int, check_seed
from odm.dataset import STATE_KEY, fresh_skeletons
from odm.hf_state import skeleton_id
from odm.schedule import ProportionSchedule
from odm.sources import Source, as_source

__all__ = ["PackedMixtureDataset", "PackingIterator"]

_STATE_VERSION = 2
#: Standalone state versions still loaded: 1 had no source state snapshots (its row ends with the carry).
_LOADS = (1, 2)


def _tokens(doc: Any, key: str, domain: str) -> np.ndarray:
    """One document as a 1-D int64 array (from a sequence, array, tensor, or a mapping holding one at ``key``)."""
    if isinstance(doc, Mapping):
        if key not in doc:
            raise KeyError(f"a document of domain {domain!r} has no {key!r} entry (keys: {sorted(doc)[:8]})")
        doc = doc[key]
    if isinstance(doc, torch.Tensor):
        doc = doc.detach().cpu().numpy()
    arr = np.asarray(doc)
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise TypeError(
            f"a document of domain {domain!r} must be a 1-D sequence of integer token ids, "
            f"got shape {arr.shape} and dtype {arr.dtype}"
        )
    return arr.astype(np.int64, copy=False)


class _DocStream:
    """One domain's documents in one shard, at an explicit position ``(epoch, position)``; passes restart."""

    __slots__ = (
        "_it", "_tokens_in_pass", "epoch", "key", "name", "num_shards", "position", "seed", "shard", "skeletons",
        "snap", "source", "width",
    )  # fmt: skip

    def __init__(self, name: str, source: Source, shard: int, num_shards: int, seed: int, key: str) -> None:
        self.name, self.source, self.shard, self.num_shards, self.seed, self.key = (
            name, source, shard, num_shards, seed, key,
        )  # fmt: skip
        self.epoch = 0
        self.position = 0
        self._it: Iterator[Any] | None = None
        self._tokens_in_pass: int | None = None  # None: this pass was not read from its start here
        # A source that resumes from snapshots of its own state (odm.hf_sources.HFIterableSource), as in
        # odm.dataset._DomainStream: the columns its snapshot takes in the row, the one restored for the current
        # pass, the skeletons to decode it.
        self.width: int = getattr(source, "snapshot_width", 0)
        self.snap: list[int] | None = None
        self.skeletons: Mapping[int, str] | None = None

    def _open(self, epoch: int, start: int) -> Iterator[Any]:
        where: dict[str, Any] = {"shard": self.shard, "num_shards": self.num_shards, "epoch": epoch}
        if self.width and self.snap is not None and epoch == self.epoch:  # (the restored snapshot is of this pass)
            where |= {"snapshot": self.snap, "skeletons": self.skeletons}
        return self.source.open(**where, start=start, seed=self.seed)

    def next_doc(self) -> np.ndarray:
        """The next non-empty document, starting a new pass when this one ends."""
        while True:
            if self._it is None:
                self._it = self._open(self.epoch, self.position)
                if self.position == 0:
                    self._tokens_in_pass = 0
            try:
                doc = next(self._it)
            except StopIteration:
                if self._tokens_in_pass == 0:
                    raise ValueError(
                        f"domain {self.name!r} has no tokens in shard {self.shard} of {self.num_shards} "
                        "(rank x worker); give it more documents or use fewer workers or ranks"
                    ) from None
                self.epoch, self.position, self._it, self.snap = self.epoch + 1, 0, None, None
                continue
            self.position += 1
            tokens = _tokens(doc, self.key, self.name)
            if self._tokens_in_pass is not None:
                self._tokens_in_pass += tokens.size
            if tokens.size:
                return tokens

    def reopen_last(self) -> np.ndarray:
        """The document this stream read last (item ``position - 1`` of its pass: a checkpoint's carried
        document), reopening the pass there; the stream then continues from the same iterator, so a resume opens
        the source (and restores its snapshot) once."""
        it = self._open(self.epoch, self.position - 1)
        missing = object()
        doc = next(it, missing)
        if doc is missing:
            raise ValueError(
                f"domain {self.name!r}: the checkpoint's carried document {self.position - 1} of pass {self.epoch} "
                "is gone"
            )
        self._it, self._tokens_in_pass = it, None
        return _tokens(doc, self.key, self.name)

    def snapshot(self, carried: bool) -> list[int]:
        """The snapshot columns of this stream's row: the open pass's newest snapshot, else the restored one,
        else none (``-1``), as in unpacked loaders.

        While ``carried`` (the slot carries the document this stream read last, item ``position - 1``) a resume
        must read that document again, which a snapshot taken after it cannot give: the newest one is then
        replaced by the one before it, ``state_every`` rows older: a resume still skips fewer than
        ``state_every`` rows to reach the carried document, then reads on from there.
        """
        it = self._it
        snap = self.snap if it is None else getattr(it, "snapshot", None)
        if carried and snap is not None and snap[0] >= self.position:
            snap = None if it is None else getattr(it, "previous", None)
        return [-1] * self.width if snap is None else snap


class PackedMixtureDataset(torch.utils.data.IterableDataset):
    """An ``IterableDataset`` of packed batches ``[B, T]`` whose proportions are token shares.

    Use it with ``DataLoader(dataset, batch_size=None, num_workers=...)``; pass an
    :class:`odm.OnlineMixer`'s ``schedule`` so the policy's proportions drive the packing.

    Args:
        sources: ``{domain: source of documents}``; a document is a 1-D sequence of token ids (list, array,
            tensor) or a mapping holding one under ``tokens_key``. Anything :func:`odm.sources.as_source`
            accepts.
        batch_size: rows per batch ``B``.
        pack_length: tokens per row ``T``.
        schedule: the shared proportions (token shares); default: a new uniform schedule.
        seed: seeds the sources' shuffling.
        tokens_key: the key of the token ids in mapping documents, and of the packed ids in the batch.

    Raises:
        TypeError / ValueError: a bad argument (named in the message).

    Example:
        >>> docs = {"a": [[1] * 5] * 50, "b": [[2] * 20] * 50}
        >>> ds = PackedMixtureDataset(docs, batch_size=2, pack_length=8)
        >>> batch = next(iter(ds))
        >>> batch["input_ids"].shape, batch["token_domain"].tolist()
        (torch.Size([2, 8]), [[0, 0, 0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1]])
    """

    def __init__(
        self,
        sources: Mapping[str, Any],
        *,
        batch_size: int,
        pack_length: int,
        schedule: ProportionSchedule | None = None,
        seed: int = 0,
        tokens_key: str = "input_ids",
    ) -> None:
        if not isinstance(sources, Mapping) or not sources:
            raise ValueError(f"`sources` must be a non-empty mapping {{domain: source}}, got {sources!r:.80}")
        if not isinstance(tokens_key, str) or not tokens_key:
            raise TypeError(f"`tokens_key` must be a non-empty string, got {tokens_key!r}")
        self.domains: list[str] = [str(d) for d in sources]
        self.sources: list[Source] = [as_source(s, domain=d) for d, s in sources.items()]
        self.batch_size = int(check_int(batch_size, "batch_size", low=1))
        self.pack_length = int(check_int(pack_length, "pack_length", low=1))
        self.seed = check_seed(seed)
        self.tokens_key = tokens_key
        if schedule is None:
            schedule = ProportionSchedule(len(self.domains))
        if schedule.num_domains != len(self.domains):
            raise ValueError(f"`schedule` has {schedule.num_domains} domains but `sources` has {len(self.domains)}")
        self.schedule = schedule
        # {skeleton id: skeleton} of the sources' state snapshots (odm.hf_state), set by the loader before the
        # workers start: what a restored snapshot is decoded with.
        self.skeletons: dict[int, str] = {}
        # What odm.MixtureLoader reads from its dataset (and saves in its checkpoint's configuration): packing
        # mixes tokens, restarts every pass and has no repetition budget.
        self.granularity = "token"
        self.exhausted = "restart"
        self.max_passes: list[int | None] = [None] * len(self.domains)
        # Set by the process that owns the loader before workers start (as for odm.MixtureDataset).
        self.rank = 0
        self.world_size = 1
        self.attach_state = False
        # Shared (1 + num_workers, state_width) int64 block, or None: row 0 column 0 holds the next global batch;
        # row 1 + slot holds that slot's PackingIterator.state_row, column 0 = -1 while fresh.
        self.start_rows: torch.Tensor | None = None
        # A packed loader does not resume on another topology (its carried documents and deficits are per slot).
        self.plans: None = None

    @property
    def num_domains(self) -> int:
        return len(self.domains)

    @property
    def snapshot_widths(self) -> list[int]:
        """Per domain, the columns its source's state snapshot takes at the end of a state row (0: none)."""
        return [getattr(s, "snapshot_width", 0) for s in self.sources]

    @property
    def base_width(self) -> int:
        """Length of a slot's state row without snapshots: next batch, epochs, positions, deficits (float64
        bits), carry."""
        return 1 + 3 * self.num_domains + 2

    @property
    def state_width(self) -> int:
        """Length of a slot's state row: :attr:`base_width`, then each snapshot's columns."""
        return self.base_width + sum(self.snapshot_widths)

    def __iter__(self) -> PackingIterator:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        start = 0 if self.start_rows is None else max(0, int(self.start_rows[0, 0]))
        it = PackingIterator(self, slot=(worker + start) % num_workers, num_slots=num_workers, start=start)
        if self.start_rows is not None:
            it.load_row(self.start_rows[1 + it.slot].tolist())
        return it


class PackingIterator:
    """The packing state of one slot (global batches ``≡ slot mod num_slots``): its batch counter, each domain
    stream's position, the per-domain token deficits and the partial document being carried.

    ``state_dict()`` / ``load_state_dict()`` resume it exactly, mid-document included.
    """

    def __init__(self, dataset: PackedMixtureDataset, *, slot: int = 0, num_slots: int = 1, start: int = 0) -> None:
        self.ds = dataset
        self.slot, self.num_slots = slot, num_slots
        shard = dataset.rank * num_slots + slot
        num_shards = dataset.world_size * num_slots
        self.streams = [
            _DocStream(name, src, shard, num_shards, dataset.seed, dataset.tokens_key)
            for name, src in zip(dataset.domains, dataset.sources)
        ]
        # k: this slot's next batch is global batch k * num_slots + slot (the first one at or after `start`).
        self.local_batch = max(0, (start - slot + num_slots - 1) // num_slots)
        self.deficit = np.zeros(dataset.num_domains)  # target minus placed tokens, per domain
        self._carry: tuple[int, np.ndarray, int] | None = None  # (domain, document, tokens already placed)
        # Streams whose source takes state snapshots (their columns end the row, in domain order), and the
        # skeletons that decode them: the loader's (restored) ones, plus those seen here.
        self._snapshotting = [(d, s) for d, s in enumerate(self.streams) if s.width]
        self._snapshot_streams = [s for _, s in self._snapshotting]
        self.skeletons: dict[int, str] = dataset.skeletons  # (shared: a persistent worker keeps what it learnt)
        for _, s in self._snapshotting:
            s.skeletons = self.skeletons

    # -- state -----------------------------------------------------------------------------------------------
    def state_row(self, next_batch: int) -> list[int]:
        """``[next_batch, epochs…, positions…, deficit bits…, carry domain, carry offset]`` (ints only), then
        the snapshot columns of the sources that take them.

        The deficits travel as the bits of their float64 values, so a resume restores them exactly. The carried
        document is the last one its domain's stream read, so its position suffices to read it again; that
        domain's snapshot is one from before it (:meth:`_DocStream.snapshot`).
        """
        d, off = (-1, 0) if self._carry is None else (self._carry[0], self._carry[2])
        row = (
            [next_batch]
            + [s.epoch for s in self.streams]
            + [s.position for s in self.streams]
            + self.deficit.view(np.int64).tolist()
            + [d, off]
        )
        for i, s in self._snapshotting:
            row += s.snapshot(i == d)
        return row

    def load_row(self, row: list[int]) -> None:
        """Restores :meth:`state_row` (a row whose first entry is negative means a fresh slot). A row without
        snapshot columns (written before they existed) resumes by skipping."""
        if int(row[0]) < 0:
            return
        k = self.ds.num_domains
        base = self.ds.base_width
        if len(row) not in (base, self.ds.state_width):
            widths = sorted({base, self.ds.state_width})
            raise ValueError(f"packing state row has {len(row)} entries, expected {' or '.join(map(str, widths))}")
        self.local_batch = max(0, (int(row[0]) - self.slot + self.num_slots - 1) // self.num_slots)
        for i, s in enumerate(self.streams):
            s.epoch, s.position, s._it, s._tokens_in_pass = int(row[1 + i]), int(row[1 + k + i]), None, None
            s.snap = None
        tail = [int(v) for v in row[base:]]
        for _, s in self._snapshotting if tail else ():
            s.snap, tail = (tail[: s.width] if tail[0] >= 0 else None), tail[s.width :]
        self.deficit = np.array([int(x) for x in row[1 + 2 * k : 1 + 3 * k]], dtype=np.int64).view(np.float64)
        d, off = int(row[1 + 3 * k]), int(row[2 + 3 * k])
        self._carry = None
        if d >= 0:
            if not (d < k and self.streams[d].position >= 1 and off >= 1):
                raise ValueError(f"packing state row has an invalid carried document (domain {d}, offset {off})")
            s = self.streams[d]
            doc = s.reopen_last()
            if off >= doc.size:
                raise ValueError(
                    f"packing state row carries token {off} of a {doc.size}-token document of domain "
                    f"{s.name!r}: the source changed since the checkpoint"
                )
            self._carry = (d, doc, off)

    def state_dict(self) -> dict[str, Any]:
        """This slot's state as a plain versioned dict (for use without :class:`odm.MixtureLoader`)."""
        b = self.local_batch * self.num_slots + self.slot
        row = self.state_row(b)
        known = dict(self.skeletons)
        for _, s in self._snapshotting:
            known |= getattr(s._it, "fresh", None) or {}  # (read, not taken: a loader may still ship them)
        at, ids = self.ds.base_width, set()
        for _, s in self._snapshotting:
            if row[at] >= 0:
                ids.add(row[at + 1])
            at += s.width
        return {
            "version": _STATE_VERSION,
            "domains": list(self.ds.domains),
            "slot": self.slot,
            "num_slots": self.num_slots,
            "row": row,
            "skeletons": [known[i] for i in sorted(ids) if i in known],
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restores :meth:`state_dict`; the next batch is the one after the saved one, bit for bit.

        Raises:
            ValueError: another version, domain set or slot layout than the checkpoint's.
        """
        if state_dict.get("version") not in _LOADS:
            raise ValueError(f"packing state has version {state_dict.get('version')!r}, expected one of {list(_LOADS)}")
        if list(state_dict["domains"]) != self.ds.domains:
            raise ValueError(
                f"packing state is for domains {state_dict['domains']}, this dataset has {self.ds.domains}"
            )
        if (state_dict["slot"], state_dict["num_slots"]) != (self.slot, self.num_slots):
            raise ValueError(
                f"packing state is for slot {state_dict['slot']} of {state_dict['num_slots']}, "
                f"this iterator is slot {self.slot} of {self.num_slots}"
            )
        for skeleton in state_dict.get("skeletons") or []:
            self.skeletons[skeleton_id(skeleton)] = skeleton
        self.load_row(list(state_dict["row"]))

    # -- iteration -------------------------------------------------------------------------------------------
    def __iter__(self) -> PackingIterator:
        return self

    def __next__(self) -> dict[str, Any]:
        b = self.local_batch * self.num_slots + self.slot
        p = self.ds.schedule.lookup(b)[0]
        tokens, domains, starts = self._pack(p)
        self.local_batch += 1
        batch = self._assemble(tokens, domains, starts)
        batch["mix_step"] = b
        if self.ds.attach_state:
            batch[STATE_KEY] = {"slot": self.slot, "row": self.state_row(b + 1)}
            if self._snapshotting:
                batch[STATE_KEY]["skeletons"] = fresh_skeletons(self._snapshot_streams)
        return batch

    def _choose(self, live: np.ndarray) -> int:
        """The domain of the next document: the largest deficit among ``live`` domains (lowest index on ties)."""
        return int(np.where(live, self.deficit, -np.inf).argmax())

    def _pack(self, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """Fills ``B * T`` tokens; returns the tokens, their domains and the flat offsets where pieces start."""
        n = self.ds.batch_size * self.ds.pack_length
        tokens = np.empty(n, dtype=np.int64)
        domains = np.empty(n, dtype=np.int64)
        starts: list[int] = []
        self.deficit += p * n
        live = p > 0
        pos = 0
        while pos < n:
            if self._carry is None:
                d = self._choose(live)
                doc, off = self.streams[d].next_doc(), 0
            else:
                d, doc, off = self._carry
            take = min(doc.size - off, n - pos)
            tokens[pos : pos + take] = doc[off : off + take]
            domains[pos : pos + take] = d
            starts.append(pos)
            self.deficit[d] -= take
            pos += take
            off += take
            self._carry = (d, doc, off) if off < doc.size else None
        return tokens, domains, starts

    def _assemble(self, tokens: np.ndarray, domains: np.ndarray, starts: list[int]) -> dict[str, Any]:
        b, t = self.ds.batch_size, self.ds.pack_length
        n = b * t
        # Segments: every piece start plus every row start (a piece crossing a row boundary is two segments).
        is_start = np.zeros(n, dtype=bool)
        is_start[starts] = True
        is_start[::t] = True
        bounds = np.flatnonzero(is_start)
        lengths = np.diff(np.append(bounds, n))
        position_ids = np.arange(n, dtype=np.int64) - np.repeat(bounds, lengths)
        cu_seqlens = np.append(bounds, n).astype(np.int32)
        return {
            self.ds.tokens_key: torch.from_numpy(tokens.reshape(b, t)),
            "token_domain": torch.from_numpy(domains.reshape(b, t)),
            "position_ids": torch.from_numpy(position_ids.reshape(b, t)),
            "cu_seqlens": torch.from_numpy(cu_seqlens),
            "max_seqlen": int(lengths.max()),
        }
