"""``OnlineMixing``: the Lightning callback that feeds training losses to an :class:`odm.OnlineMixer`.

It maps Lightning hooks to mixer calls and does nothing else:

* ``on_train_batch_end`` (every micro-batch): ``mixer.observe(batch, sample_losses)``; on the micro-batch
  that ends an optimizer step, ``mixer.step()`` — after a held-out evaluation when the mixer asks for one;
* every ``log_every`` optimizer steps: ``mix/p/<domain>`` and ``mix/loss/<domain>`` to the Trainer's loggers;
* checkpoints: nothing, when an :class:`odm.MixtureLoader` holding the mixer is the train dataloader —
  Lightning saves a stateful train loader's ``state_dict()`` on every rank and restores it before iterating,
  and the loader's state is cut at the last batch the mixer stepped on and holds the mixer. Otherwise the
  callback's own state holds the mixer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from odm._checks import check_int
from odm.loader import MixtureLoader
from odm.mixer import OnlineMixer
from odm.policies import EVAL_LOSS
from odm.stats import DomainLoss, evaluate_domains

__all__ = ["SAMPLE_LOSSES", "OnlineMixing"]

#: The key of ``training_step``'s output dict that holds the per-sample losses ``[B]``.
SAMPLE_LOSSES = "sample_losses"
_STATE_VERSION = 2

_WHAT_TO_RETURN = (
    "return the per-sample losses from `training_step`, e.g.\n"
    "    losses = F.cross_entropy(logits, target, reduction='none')   # shape [B]\n"
    f"    return {{'loss': losses.mean(), '{SAMPLE_LOSSES}': losses}}\n"
    "(a scalar loss alone is enough only when every batch is one domain: MixtureLoader(granularity='batch'))"
)


def _leaves(tree: Any) -> list[Any]:
    """The loaders of Lightning's ``train_dataloader`` (a loader, or a list / dict of them)."""
    if isinstance(tree, Mapping):
        return [x for v in tree.values() for x in _leaves(v)]
    if isinstance(tree, list | tuple):
        return [x for v in tree for x in _leaves(v)]
    return [] if tree is None else [tree]


def _domain_ids(batch: Mapping[str, Any]) -> torch.Tensor:
    """The batch's domain ids: ``token_domain`` ``[B, T]`` for a packed batch, else ``domain`` ``[B]``."""
    return batch["token_domain"] if "token_domain" in batch else batch["domain"]


class OnlineMixing(Callback):
    """Closes the mixing loop inside a Lightning ``Trainer``.

    The LightningModule's ``training_step`` returns ``{"loss": loss, "sample_losses": per_sample_losses}``
    (the callback detaches them), or just the scalar loss when every batch is one domain. Batches are the
    dicts an :class:`odm.MixtureLoader` yields (``"domain"`` ids and ``"mix_step"``). For packed sequences
    (``MixtureLoader(..., pack_length=T)``) ``"sample_losses"`` holds per-token losses ``[B, T]`` and each token's
    loss is credited to its own domain (``batch["token_domain"]``). ``mixer.step()`` runs
    once per optimizer step; how often the policy updates is the mixer's ``update_every``.

    Args:
        mixer: the :class:`odm.OnlineMixer`, or the :class:`odm.MixtureLoader` whose mixer to drive.
        log_every: log ``mix/p/<domain>`` and ``mix/loss/<domain>`` every N optimizer steps; default: the
            Trainer's ``log_every_n_steps``. ``mix/loss`` is the mean training loss per domain since the
            previous log, summed across ranks (:class:`odm.stats.DomainLoss`); rank zero writes.
        eval_loaders: ``{domain: held-out loader}`` for policies that need per-domain held-out loss (Aioli,
            Skill-It). Evaluated, in eval mode under ``no_grad``, whenever ``mixer.wants_eval()`` says so (only
            before a step that updates the policy) and every ``eval_every`` optimizer steps; the sums and counts
            go to ``mixer.observe_eval``.
        eval_every: also evaluate every N optimizer steps (``None``: only when the policy asks).
        eval_fn: ``(pl_module, batch) -> per-sample losses [B]`` for one held-out batch (required with
            ``eval_loaders``).
        eval_max_batches: read at most this many batches of each held-out loader per evaluation.

    Raises:
        TypeError: ``mixer`` is neither an ``OnlineMixer`` nor a ``MixtureLoader``; ``eval_loaders`` is not a
            mapping or ``eval_fn`` is not callable.
        ValueError: a non-positive interval, held-out data for unknown domains, ``eval_loaders`` without
            ``eval_fn`` (or the reverse), or a policy that requires held-out losses with no ``eval_loaders``.

    Checkpoints: resuming with ``trainer.fit(..., ckpt_path=...)`` continues with the same proportions and the
    same batches as an uninterrupted run — single process or DDP (the file rank zero writes resumes every
    rank), any ``num_workers``, gradient accumulation, a checkpoint between two policy updates. The mixer is
    saved once: inside the train loader's state, or in this callback's when no train loader holds it.

    Example::

        loader = odm.MixtureLoader(sources, batch_size=32, policy="exp3")
        trainer = Trainer(max_steps=1000, callbacks=[OnlineMixing(loader)])
        trainer.fit(model, train_dataloaders=loader)
    """

    def __init__(
        self,
        mixer: OnlineMixer | MixtureLoader,
        *,
        log_every: int | None = None,
        eval_loaders: Mapping[str, Iterable[Any]] | None = None,
        eval_every: int | None = None,
        eval_fn: Callable[[pl.LightningModule, Any], torch.Tensor] | None = None,
        eval_max_batches: int | None = None,
    ) -> None:
        if isinstance(mixer, MixtureLoader):
            self.mixer = mixer.mixer
        elif isinstance(mixer, OnlineMixer):
            self.mixer = mixer
        else:
            raise TypeError(f"`mixer` must be an odm.OnlineMixer or an odm.MixtureLoader, got {type(mixer).__name__}")
        self.log_every = check_int(log_every, "log_every", low=1, allow_none=True)
        self.eval_every = check_int(eval_every, "eval_every", low=1, allow_none=True)
        self.eval_max_batches = check_int(eval_max_batches, "eval_max_batches", low=1, allow_none=True)
        if eval_loaders is not None:
            if not isinstance(eval_loaders, Mapping):
                raise TypeError(
                    f"`eval_loaders` must be a mapping {{domain: held-out loader}}, got {type(eval_loaders).__name__}"
                )
            unknown = [d for d in eval_loaders if d not in self.mixer.domains]
            if unknown:
                raise ValueError(f"`eval_loaders` names unknown domains {unknown}; domains: {self.mixer.domains}")
            if eval_fn is None:
                raise ValueError(
                    "`eval_loaders` needs `eval_fn=lambda module, batch: per_sample_losses` (shape [B]) to "
                    "turn a held-out batch into losses"
                )
        if eval_fn is not None and not callable(eval_fn):
            raise TypeError(f"`eval_fn` must be callable (module, batch) -> losses, got {type(eval_fn).__name__}")
        if eval_loaders is None and (eval_every is not None or eval_fn is not None):
            raise ValueError("`eval_every` and `eval_fn` need `eval_loaders` ({domain: held-out loader})")
        if eval_loaders is None and EVAL_LOSS in self.mixer.policy.requires:
            raise ValueError(
                f"policy {self.mixer.policy!r} needs per-domain held-out losses: pass "
                "`eval_loaders={domain: loader}` and `eval_fn=lambda module, batch: per_sample_losses`"
            )
        self.eval_loaders = eval_loaders
        self.eval_fn = eval_fn
        self.metric = DomainLoss(self.mixer.domains)
        self._state_key = self._generate_state_key(domains=tuple(self.mixer.domains))
        self._loader_saves_mixer = False  # set at on_train_start
        self._seen_global_step = -1
        self._log_every = 50
        self._checked_scalar = False
        # (domain ids, losses) of the steps since the last log, fed to `metric` in one update when logging
        # (a torchmetrics update per step costs more than the rest of this callback together).
        self._window: list[tuple[torch.Tensor, torch.Tensor]] = []

    @property
    @override
    def state_key(self) -> str:
        # Lightning reads it on every hook call (profiler names): computed once.
        return self._state_key

    # -- hooks -----------------------------------------------------------------------------------------------
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.metric.to(pl_module.device)
        self.metric.reset()
        self._window.clear()

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._seen_global_step = trainer.global_step
        self._log_every = self.log_every or getattr(trainer, "log_every_n_steps", None) or 50
        loaders = [dl for dl in _leaves(trainer.train_dataloader) if isinstance(dl, MixtureLoader)]
        self._loader_saves_mixer = any(dl.mixer is self.mixer for dl in loaders)
        if loaders and not self._loader_saves_mixer:
            rank_zero_warn(
                "odm: the train dataloader is a MixtureLoader with another mixer than this OnlineMixing's: its "
                "proportions will not follow the feedback. Pass that loader (or its .mixer) to OnlineMixing"
            )

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        domain, losses = self._losses(trainer, pl_module, outputs, batch)
        mixer = self.mixer
        mixer.observe(batch, losses)
        if domain.ndim > 1:  # a packed batch: per-token ids and losses, padding (-1) left out of the log
            keep = domain.reshape(-1) >= 0
            domain, losses = domain.reshape(-1)[keep], losses.reshape(-1)[keep]
        elif not losses.ndim:
            losses = losses.expand(domain.shape)
        self._window.append((domain, losses))
        step = trainer.global_step
        if step == self._seen_global_step:
            return  # a micro-batch of gradient accumulation: no optimizer step yet
        self._seen_global_step = step
        if self.eval_loaders is not None and (
            mixer.wants_eval() or (self.eval_every is not None and step % self.eval_every == 0)
        ):
            self._evaluate(pl_module)
        mixer.step()
        if step % self._log_every == 0:
            self._log(trainer, step)

    # -- feedback --------------------------------------------------------------------------------------------
    def _losses(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's domain ids and the per-sample (or one-domain scalar) losses of ``outputs``, detached,
        checked against the batch."""
        if type(outputs) is dict and type(batch) is dict:  # the usual call: dicts from training_step and the loader
            losses = outputs.get(SAMPLE_LOSSES)
            domain = batch.get("domain")
            if (
                type(losses) is torch.Tensor
                and type(domain) is torch.Tensor
                and losses.shape == domain.shape
                and "token_domain" not in batch
            ):
                return domain, losses.detach()
        if not isinstance(batch, Mapping) or ("domain" not in batch and "token_domain" not in batch):
            raise TypeError(
                "OnlineMixing needs batches with a 'domain' entry (LongTensor[B]) or, packed, a 'token_domain' entry "
                f"(LongTensor[B, T]), as odm.MixtureLoader yields; got a {type(batch).__name__}"
                + (f" with keys {sorted(batch)}" if isinstance(batch, Mapping) else "")
            )
        if isinstance(outputs, torch.Tensor):
            outputs = {"loss": outputs}
        if not isinstance(outputs, Mapping):
            raise TypeError(
                f"training_step returned {type(outputs).__name__}; OnlineMixing needs losses: {_WHAT_TO_RETURN}"
            )
        domain = _domain_ids(batch)
        losses = outputs.get(SAMPLE_LOSSES)
        if losses is not None:
            if not isinstance(losses, torch.Tensor) or losses.shape != domain.shape:
                got = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
                packed = domain.ndim > 1
                what = "tensor with one loss per token of the packed batch" if packed else "1-D tensor, one per sample"
                raise ValueError(
                    f"'{SAMPLE_LOSSES}' must be a {what} (shape {list(domain.shape)}), got {got}: {_WHAT_TO_RETURN}"
                )
            return domain, losses.detach()
        if domain.ndim > 1:
            raise TypeError(
                f"a packed batch mixes domains within each sequence: training_step must return per-token losses as "
                f"'{SAMPLE_LOSSES}' (shape {list(domain.shape)}, reduction='none'), not only a scalar 'loss'"
            )
        loss = outputs.get("loss")
        if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
            got = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise TypeError(
                f"training_step's output has no '{SAMPLE_LOSSES}' and no scalar 'loss' (got {got}): {_WHAT_TO_RETURN}"
            )
        if not self._checked_scalar:  # one check (a host sync on an accelerator); the mixer re-checks on CPU
            self._checked_scalar = True
            if domain.numel() > 1 and bool((domain != domain.reshape(-1)[0]).any()):
                raise ValueError(
                    f"training_step returned only a scalar 'loss', but this batch mixes domains "
                    f"{sorted(set(domain.tolist()))}: {_WHAT_TO_RETURN}"
                )
        if pl_module.automatic_optimization:
            # NOTE: Lightning divides the loss it hands back by accumulate_grad_batches; undo that.
            loss = loss * trainer.accumulate_grad_batches
        return domain, loss.detach()

    def _evaluate(self, pl_module: pl.LightningModule) -> None:
        """Per-domain held-out sums and counts in eval mode under ``no_grad``, handed to the mixer."""
        assert self.eval_loaders is not None and self.eval_fn is not None
        eval_fn = self.eval_fn
        modes = {m: m.training for m in pl_module.modules()}
        pl_module.eval()
        try:
            loss_sum, count = evaluate_domains(
                lambda batch: eval_fn(pl_module, batch),
                self.eval_loaders,
                domains=self.mixer.domains,
                device=pl_module.device,
                max_batches=self.eval_max_batches,
            )
        finally:
            for m, training in modes.items():  # restores submodules kept in eval mode on purpose, too
                m.training = training
        self.mixer.observe_eval(loss_sum, count)

    def _log(self, trainer: pl.Trainer, step: int) -> None:
        # compute() sum-reduces the per-domain sums and counts across ranks: every rank calls it at this step.
        if not trainer.loggers:  # the same on every rank, so no rank waits in a sync the others skip
            self._window.clear()
            return
        if self._window:
            ids, losses = zip(*self._window)
            self._window.clear()
            self.metric.update(torch.cat(ids), torch.cat(losses))
        metrics = {f"mix/loss/{d}": v for d, v in self.metric.as_dict().items()}
        self.metric.reset()
        metrics.update({f"mix/p/{d}": float(p) for d, p in zip(self.mixer.domains, self.mixer.proportions)})
        if trainer.is_global_zero:  # proportions agree on every rank; write them once
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)

    # -- checkpointing ---------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        # The mixer is saved once: by the train loader when one holds it (Lightning saves its state_dict()).
        return {"version": _STATE_VERSION, "mixer": None if self._loader_saves_mixer else self.mixer.state_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("version") != _STATE_VERSION:
            raise ValueError(f"OnlineMixing state has version {state_dict.get('version')!r}, expected {_STATE_VERSION}")
        if state_dict.get("mixer") is not None:
            self.mixer.load_state_dict(state_dict["mixer"])
