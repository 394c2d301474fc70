"""``OnlineMixingTrainer``: a Hugging Face ``transformers.Trainer`` that trains on an :class:`odm.MixtureLoader`.

It maps the Trainer's public hooks to mixer calls and does nothing else:

* ``get_train_dataloader``: the ``MixtureLoader`` itself — not wrapped by ``accelerate``, whose dataloader
  preparation would re-shard it across ranks (the loader already shards by rank) and whose
  ``skip_first_batches`` would replay the epoch on resume (the loader resumes itself);
* ``compute_loss`` (every micro-batch, training only): the Trainer's own loss for the backward pass, and
  ``mixer.observe(domain, per_sample_losses, weight=tokens)`` from the logits — each sequence's token-mean
  loss, weighted by its token count; for packed batches (``MixtureLoader(pack_length=T)``) the per-token losses
  ``[B, T]`` with ``token_domain``, each target token credited to its own domain (labels made from the ids,
  ignored at padding and at every document start, so no loss crosses documents);
* ``on_step_end`` (every optimizer step, so once per gradient-accumulation window): ``mixer.step()``;
* ``log``: the Trainer's training logs gain ``mix/p/<domain>`` and ``mix/loss/<domain>``, so every reporter
  (TensorBoard, W&B, ``state.log_history``) gets them;
* ``on_save``: ``loader.state_dict()`` (the mixer included) into each checkpoint folder, written by the
  process that saves; ``train(resume_from_checkpoint=…)`` loads it back before the first batch.

Install with ``pip install 'torch-odm[hf]'``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from odm._checks import check_int
from odm._dist import all_reduce_host, distributed
from odm.callbacks.causal_lm import causal_lm_sample_losses, causal_lm_token_losses, packed_labels
from odm.loader import MixtureLoader
from odm.policies import EVAL_LOSS
from odm.stats import evaluate_domains

try:
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "odm.callbacks.transformers needs Hugging Face transformers and accelerate: pip install 'torch-odm[hf]'"
    ) from err

__all__ = [
    "LOADER_STATE_NAME",
    "OnlineMixingMixin",
    "OnlineMixingTrainer",
    "causal_lm_sample_losses",
    "causal_lm_token_losses",
    "packed_labels",
]

#: The file inside each checkpoint folder that holds ``loader.state_dict()``.
LOADER_STATE_NAME = "odm_loader.pt"
# Keys a MixtureLoader adds to every batch; the model never sees them.
_BATCH_KEYS = ("domain", "mix_step")
# Keys of a packed batch (odm.packing) that are odm's own and no model argument: dropped before the model.
_PACKED_KEYS = ("token_domain", "cu_seqlens", "max_seqlen")
_NEEDS_LABELS = (
    "OnlineMixingTrainer needs the batch's `labels` ([B, T] token ids, -100 where nothing is predicted; a collator "
    "sets them, e.g. DataCollatorForLanguageModeling(tokenizer, mlm=False)) and the model's `logits` for "
    "per-sequence losses; override `sample_losses(outputs, labels)` for a model that is not a causal LM"
)


class OnlineMixingMixin:
    """The online-mixing behaviour, for any ``transformers.Trainer`` subclass (TRL's trainers included).

    Put it first among the bases: ``class MixedSFTTrainer(OnlineMixingMixin, SFTTrainer): pass``, then
    ``MixedSFTTrainer(loader, model=…, args=…, …)``. :class:`OnlineMixingTrainer` is the mixin on the plain
    ``Trainer``. See :class:`OnlineMixingTrainer` for the arguments.
    """

    # Set by transformers.Trainer.__init__; declared for the type checker.
    args: Any
    model: Any
    state: Any

    def __init__(
        self,
        loader: MixtureLoader,
        *args: Any,
        eval_loaders: Mapping[str, Iterable[Any]] | None = None,
        eval_max_batches: int | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(loader, MixtureLoader):
            raise TypeError(
                f"`loader` must be an odm.MixtureLoader (it yields the batches and holds the mixer), got "
                f"{type(loader).__name__}"
            )
        if kwargs.get("train_dataset") is not None:
            raise TypeError("pass the data as `loader` (an odm.MixtureLoader), not as `train_dataset`")
        check_int(eval_max_batches, "eval_max_batches", low=1, allow_none=True)
        mixer = loader.mixer
        if eval_loaders is not None:
            if not isinstance(eval_loaders, Mapping):
                raise TypeError(
                    f"`eval_loaders` must be a mapping {{domain: held-out batches}}, got {type(eval_loaders).__name__}"
                )
            unknown = [d for d in eval_loaders if d not in mixer.domains]
            if unknown:
                raise ValueError(f"`eval_loaders` names unknown domains {unknown}; the domains are {mixer.domains}")
        elif EVAL_LOSS in mixer.policy.requires:
            raise ValueError(
                f"policy {mixer.policy!r} needs per-domain held-out losses: pass `eval_loaders={{domain: batches}}` "
                "(batches shaped like the training batches, with 'labels')"
            )
        super().__init__(*args, **kwargs)
        if self.args.auto_find_batch_size:
            raise ValueError(
                "`auto_find_batch_size=True` cannot resize an odm.MixtureLoader's batches: set `batch_size` on "
                "the loader and leave auto_find_batch_size off"
            )
        # NOTE: the loader resumes at the batch after the checkpoint by itself; the Trainer's own fast-forward
        # (skip the epoch's first batches) would skip that many *more* batches of the continued stream.
        self.args.ignore_data_skip = True
        self.loader = loader
        self.mixer = mixer
        self.eval_loaders = eval_loaders
        self.eval_max_batches = eval_max_batches
        self._mix_domain: torch.Tensor | None = None  # domain ids of the micro-batch being trained on
        self._mix_step: int | None = None
        self._mix_window: tuple[torch.Tensor, torch.Tensor] | None = None  # per-domain (Σ w·loss, Σ w) since a log
        self.add_callback(_MixingCallback(self))  # type: ignore[attr-defined]

    # -- data ------------------------------------------------------------------------------------------------
    def get_train_dataloader(self) -> MixtureLoader:
        """The ``MixtureLoader`` as it is (see the module docstring for why it is not prepared by accelerate)."""
        return self.loader

    # -- feedback --------------------------------------------------------------------------------------------
    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        if not isinstance(inputs, Mapping) or ("domain" not in inputs and "token_domain" not in inputs):
            raise TypeError(
                "OnlineMixingTrainer trains on odm.MixtureLoader batches (a mapping with 'domain', or 'token_domain' "
                f"when packed); got a {type(inputs).__name__}"
                + (f" with keys {sorted(inputs)}" if isinstance(inputs, Mapping) else "")
            )
        inputs = dict(inputs)  # the Trainer's loop keeps its own dict (it counts tokens and FLOPs from it)
        if "token_domain" in inputs:  # packed: per-token domains; labels made here unless the batch has them
            self._mix_domain = inputs["token_domain"]
            for key in _PACKED_KEYS:
                inputs.pop(key, None)
            self._label_packed(inputs)
        else:
            self._mix_domain = inputs.pop("domain")
        mix_step = inputs.pop("mix_step", None)
        self._mix_step = None if mix_step is None else int(mix_step)
        try:
            return super().training_step(model, inputs, *args, **kwargs)  # type: ignore[misc]
        finally:
            self._mix_domain = None

    def _label_packed(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Gives a packed batch without ``labels`` its labels (in place): the ids, ``-100`` at padding and at each
        document start."""
        if "token_domain" in inputs and "labels" not in inputs and "shift_labels" not in inputs:
            ids = inputs[getattr(self.loader.dataset, "tokens_key", "input_ids")]
            inputs["labels"] = packed_labels(ids, inputs["token_domain"], inputs.get("position_ids"))
        return inputs

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, *args: Any, **kwargs: Any) -> Any:
        """The Trainer's micro-batches of one optimizer step, packed ones labelled first: the Trainer counts the
        predicted tokens of all of them (``num_items_in_batch``) to normalise the loss under gradient
        accumulation, and a batch without labels would not be counted."""
        labelled = (self._label_packed(b) if isinstance(b, dict) else b for b in epoch_iterator)
        return super().get_batch_samples(labelled, num_batches, *args, **kwargs)  # type: ignore[misc]

    def compute_loss(
        self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False, **kwargs: Any
    ) -> Any:
        """The Trainer's loss (unchanged), and, for a training micro-batch, per-sample losses to the mixer."""
        domain = self._mix_domain
        if domain is None:  # evaluation, prediction: the plain Trainer
            return super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)  # type: ignore[misc]
        labels = inputs.get("shift_labels", inputs.get("labels"))  # read first: the Trainer may pop them
        shifted = "shift_labels" in inputs
        if not isinstance(labels, torch.Tensor):
            raise TypeError(_NEEDS_LABELS)
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, **kwargs)  # type: ignore[misc]
        if domain.ndim > 1:  # packed: each target token's loss to its own domain; unpredicted tokens count nowhere
            token_losses, mask = self.token_losses(outputs, labels, shifted=shifted)
            ids = torch.where(mask, domain.to(token_losses.device), -1)
            packed = {"token_domain": ids} | ({} if self._mix_step is None else {"mix_step": self._mix_step})
            self.mixer.observe(packed, token_losses)
            self._add_to_window(ids[mask], token_losses[mask], torch.ones_like(token_losses[mask]))
        else:
            losses, tokens = self.sample_losses(outputs, labels, shifted=shifted)
            self.mixer.observe(domain, losses, weight=tokens, mix_step=self._mix_step)
            self._add_to_window(domain, losses, tokens)
        return (loss, outputs) if return_outputs else loss

    def sample_losses(self, outputs: Any, labels: Any, *, shifted: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample losses ``[B]`` and their weights ``[B]`` from one micro-batch's model outputs.

        Default: a causal LM's per-sequence token-mean loss and token count (:func:`causal_lm_sample_losses`).
        Override for another kind of model (a classifier: ``F.cross_entropy(outputs.logits, labels,
        reduction="none")`` and ones).
        """
        logits = outputs.get("logits") if isinstance(outputs, Mapping) else getattr(outputs, "logits", None)
        if not isinstance(logits, torch.Tensor) or not isinstance(labels, torch.Tensor):
            raise TypeError(_NEEDS_LABELS)
        return causal_lm_sample_losses(logits, labels, shift=not shifted)

    def token_losses(self, outputs: Any, labels: Any, *, shifted: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token losses ``[B, T]`` of a packed micro-batch, each at its target token's position (aligned
        with ``token_domain``), and the mask of tokens that have one.

        Default: a causal LM's (:func:`~odm.callbacks.causal_lm.causal_lm_token_losses`). Override for another
        kind of model.
        """
        logits = outputs.get("logits") if isinstance(outputs, Mapping) else getattr(outputs, "logits", None)
        if not isinstance(logits, torch.Tensor) or not isinstance(labels, torch.Tensor):
            raise TypeError(_NEEDS_LABELS)
        return causal_lm_token_losses(logits, labels, shift=not shifted)

    def _add_to_window(self, domain: torch.Tensor, losses: torch.Tensor, tokens: torch.Tensor) -> None:
        k = self.mixer.num_domains
        if self._mix_window is None:
            zeros = torch.zeros(k, dtype=torch.float64, device=losses.device)
            self._mix_window = (zeros, zeros.clone())
        loss_sum, count = self._mix_window
        ids = torch.as_tensor(domain).to(losses.device, non_blocking=True).long().reshape(-1)
        w = tokens.to(torch.float64)
        loss_sum.index_add_(0, ids, torch.where(torch.isfinite(losses), losses.to(torch.float64) * w, 0.0))
        count.index_add_(0, ids, torch.where(torch.isfinite(losses), w, 0.0))

    def _mix_evaluate(self) -> None:
        """Per-domain held-out losses (eval mode, no grad) for a policy that asked for them."""
        assert self.eval_loaders is not None
        model = self.model
        modes = {m: m.training for m in model.modules()}
        model.eval()

        def loss_fn(batch: Mapping[str, Any]) -> torch.Tensor:
            inputs = {k: v for k, v in batch.items() if k not in (*_BATCH_KEYS, "labels", "shift_labels")}
            labels = batch.get("shift_labels", batch.get("labels"))
            return self.sample_losses(model(**inputs), labels, shifted="shift_labels" in batch)[0]

        try:
            loss_sum, count = evaluate_domains(
                loss_fn,
                self.eval_loaders,
                domains=self.mixer.domains,
                device=self.args.device,
                max_batches=self.eval_max_batches,
            )
        finally:
            for m, training in modes.items():
                m.training = training
        self.mixer.observe_eval(loss_sum, count)

    # -- logging ---------------------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """The Trainer's ``log``; a training log (one with ``loss``) gains ``mix/p/*`` and ``mix/loss/*``.

        ``mix/loss/<domain>`` is the token-weighted mean training loss of the domain since the previous log,
        summed over the data-parallel ranks (every rank logs at the same steps, so the one all_reduce is safe).
        """
        if "loss" in logs and not any(k.startswith("eval_") for k in logs):
            logs = {**logs, **self._mix_metrics()}
        super().log(logs, *args, **kwargs)  # type: ignore[misc]

    def _mix_metrics(self) -> dict[str, float]:
        metrics = {f"mix/p/{d}": float(p) for d, p in zip(self.mixer.domains, self.mixer.proportions, strict=True)}
        if self._mix_window is not None:
            flat = torch.cat(self._mix_window).cpu().numpy()
            self._mix_window = None
            group = self.mixer.process_group  # the data-parallel group: each replica's samples counted once
            if distributed(group):
                flat = all_reduce_host(flat, group)
            k = self.mixer.num_domains
            for d, s, n in zip(self.mixer.domains, flat[:k], flat[k:], strict=True):
                if n > 0:
                    metrics[f"mix/loss/{d}"] = float(s / n)
        return metrics

    # -- checkpoints -----------------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train``; with ``resume_from_checkpoint`` the loader (and its mixer) resume from that
        checkpoint's ``odm_loader.pt``, so the next batches and proportions are the uninterrupted run's.

        Raises:
            FileNotFoundError: the checkpoint folder has no loader state (it was not written by this trainer).
        """
        path = resume_from_checkpoint
        if path is True:
            path = get_last_checkpoint(self.args.output_dir)  # None: the Trainer raises its own error
        if isinstance(path, str | os.PathLike):
            file = os.path.join(path, LOADER_STATE_NAME)
            if not os.path.isfile(file):
                raise FileNotFoundError(
                    f"{path} has no {LOADER_STATE_NAME}: resume an odm run from a checkpoint that "
                    "OnlineMixingTrainer wrote (it saves the loader and mixer state into every checkpoint folder)"
                )
            self.loader.load_state_dict(torch.load(file, weights_only=True))
        self._mix_window = None
        return super().train(resume_from_checkpoint, *args, **kwargs)  # type: ignore[misc]

    def _mix_save(self, checkpoint_dir: str) -> None:
        # The loader's state is local (every rank's stream rows at the cut travel in the mixer's step()
        # collective), so the process that saves writes it alone and that one file resumes every rank.
        if self.args.should_save:
            torch.save(self.loader.state_dict(), os.path.join(checkpoint_dir, LOADER_STATE_NAME))


class _MixingCallback(TrainerCallback):
    """Optimizer-step and checkpoint hooks of :class:`OnlineMixingMixin` (the Trainer's public callback API)."""

    def __init__(self, trainer: OnlineMixingMixin) -> None:
        self.trainer = trainer

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # After the optimizer step, before the Trainer logs or saves: a checkpoint holds this step's update.
        trainer = self.trainer
        if trainer.eval_loaders is not None and trainer.mixer.wants_eval():
            trainer._mix_evaluate()
        trainer.mixer.step()

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer._mix_save(os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"))


class OnlineMixingTrainer(OnlineMixingMixin, Trainer):  # type: ignore[misc]
    """A ``transformers.Trainer`` that trains on an :class:`odm.MixtureLoader` and closes the mixing loop.

    Batches are the loader's dicts (``input_ids``, ``labels``, … plus ``"domain"`` and ``"mix_step"``, which
    the model never sees). For each training micro-batch the Trainer computes its loss as usual; the
    per-sequence token-mean losses from the logits go to ``loader.mixer.observe(…, weight=tokens)``, and
    ``loader.mixer.step()`` runs once per optimizer step (gradient accumulation included). Under DDP
    (``torchrun``) each rank's loader draws its own shard and every rank steps the mixer (one all_reduce).

    Packed sequences (``MixtureLoader(pack_length=T)``): a batch carries ``input_ids``, ``token_domain`` and
    ``position_ids`` ``[B, T]`` (restarting at 0 at every document and row start). The trainer makes the
    ``labels`` (unless the batch has them): the ids, ``-100`` at padding (``token_domain == -1``) and where
    ``position_ids == 0``, so no token is predicted from the previous document; ``token_domain``,
    ``cu_seqlens`` and ``max_seqlen`` never reach the model, ``position_ids`` do (attention kernels that read
    them keep documents apart; others attend across them). The feedback is per token
    (:meth:`token_losses`): each predicted token's loss is credited to its own domain,
    ``mixer.observe({"token_domain": …}, losses [B, T])``; ``mix/loss/<domain>`` is then the token mean.

    Args:
        loader: the :class:`odm.MixtureLoader` to train on (instead of ``train_dataset``). Its ``batch_size``
            is the per-device batch; ``per_device_train_batch_size`` only feeds the Trainer's reports, and the
            ``dataloader_*`` arguments do not apply (set ``num_workers`` etc. on the loader). An infinite
            loader needs ``max_steps``; one with ``num_batches=N`` also trains by epochs (choose ``N`` a
            multiple of ``gradient_accumulation_steps`` for an exact resume across epochs).
        *args, **kwargs: ``transformers.Trainer``'s (``model=``, ``args=``, ``eval_dataset=``, …).
        eval_loaders: ``{domain: held-out batches}`` for policies that need per-domain held-out losses
            (Aioli, Skill-It), evaluated in eval mode whenever ``mixer.wants_eval()`` says so.
        eval_max_batches: read at most this many batches of each held-out loader per evaluation.

    Raises:
        TypeError: ``loader`` is not a ``MixtureLoader``, or a ``train_dataset`` is passed too.
        ValueError: ``auto_find_batch_size=True``; held-out data for unknown domains; a policy that needs
            held-out losses without ``eval_loaders``.

    Checkpoints: each checkpoint folder gains ``odm_loader.pt`` (``loader.state_dict()``: stream positions of
    every rank and worker, and the mixer). ``trainer.train(resume_from_checkpoint=…)`` loads it on every rank,
    so the next batches and proportions equal an uninterrupted run's. The Trainer's own data skipping is
    turned off (``args.ignore_data_skip = True``): the loader resumes itself.

    Example::

        loader = odm.MixtureLoader(sources, batch_size=8, policy="exp3s", collate_fn=collate)
        trainer = OnlineMixingTrainer(loader, model=model, args=TrainingArguments("out", max_steps=1000))
        trainer.train()                                   # logs mix/p/<domain> and mix/loss/<domain>
        trainer.train(resume_from_checkpoint=True)        # continues exactly
    """
