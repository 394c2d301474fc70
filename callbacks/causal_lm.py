"""Per-sample and per-token losses of a causal LM from its logits: the mixer's feedback in
:mod:`odm.callbacks.transformers` (pure torch; no ``transformers`` import).

Packed sequences (``odm.MixtureLoader(pack_length=T)``) carry ``token_domain`` and ``position_ids`` but no
labels: :func:`packed_labels` makes them, ignoring padding and the first token of every segment, so no loss
crosses a document boundary; :func:`causal_lm_token_losses` gives each target token its loss, aligned with
``token_domain``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["IGNORE_INDEX", "causal_lm_sample_losses", "causal_lm_token_losses", "packed_labels"]

IGNORE_INDEX = -100  # transformers' label padding


def causal_lm_sample_losses(
    logits: torch.Tensor, labels: torch.Tensor, *, shift: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sequence's token-mean cross-entropy and its number of predicted tokens.

    ``loss_i = Σ_t ce(logits[i, t], labels[i, t+1]) / n_i`` over the ``n_i`` positions whose label is not
    ``-100`` (a sequence without any gets loss 0 and count 0, so it weighs nothing). Computed in float32
    without a graph: it is feedback for the mixer, the backward pass uses the Trainer's own loss.

    Args:
        logits: ``[B, T, V]``.
        labels: ``[B, T]`` token ids, ``-100`` where nothing is predicted (transformers' convention).
        shift: predict ``labels[:, t+1]`` from ``logits[:, t]`` (causal LMs, labels aligned with the inputs);
            ``False`` when the labels are already shifted (a collator's ``shift_labels``).

    Returns:
        ``(losses [B], tokens [B])``, float32, on the logits' device.

    Example:
        >>> logits = torch.zeros(2, 3, 4)                     # uniform over 4 tokens: ln 4 per token
        >>> labels = torch.tensor([[1, 2, 3], [1, 2, -100]])
        >>> losses, tokens = causal_lm_sample_losses(logits, labels)
        >>> [round(x, 4) for x in losses.tolist()], tokens.tolist()
        ([1.3863, 1.3863], [2.0, 1.0])
    """
    with torch.no_grad():
        ce, mask = _target_ce(logits, labels, shift=shift, drop_last=False)
        tokens = mask.sum(dim=1).float()
        losses = (ce * mask).sum(dim=1) / tokens.clamp_min(1.0)
    return losses, tokens


def causal_lm_token_losses(
    logits: torch.Tensor, labels: torch.Tensor, *, shift: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each target token's cross-entropy, at the target's own position: ``[B, T]`` like ``token_domain``.

    ``loss[i, t] = ce(logits[i, t-1], labels[i, t])`` (with ``shift``) where ``labels[i, t] != -100``, else 0
    and masked out; position 0 of a row predicts nothing. With ``shift=False`` the labels are already shifted
    (``shift_labels[i, t] = labels[i, t+1]``) and the losses are moved to the target's position the same way.
    float32, without a graph.

    Returns:
        ``(losses [B, T], mask [B, T])``: ``mask`` marks the tokens that have a loss.

    Example:
        >>> logits = torch.zeros(1, 3, 4)                     # uniform over 4 tokens: ln 4 per token
        >>> losses, mask = causal_lm_token_losses(logits, torch.tensor([[1, 2, -100]]))
        >>> [round(x, 4) for x in losses[0].tolist()], mask[0].tolist()
        ([0.0, 1.3863, 0.0], [False, True, False])
    """
    with torch.no_grad():
        # (shift_labels[:, t] is the target of position t + 1: its last column predicts past the row)
        ce, mask = _target_ce(logits, labels, shift=shift, drop_last=True)
        b, t = mask.shape
        losses = torch.zeros(b, t + 1, dtype=torch.float32, device=ce.device)
        keep = torch.zeros(b, t + 1, dtype=torch.bool, device=ce.device)
        losses[:, 1:] = torch.where(mask, ce, 0.0)
        keep[:, 1:] = mask
    return losses, keep


def _target_ce(
    logits: torch.Tensor, labels: torch.Tensor, *, shift: bool, drop_last: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ce [B, T'], mask [B, T'])``: each prediction's cross-entropy in float32 (0 where ignored) and where a
    label is. ``shift``: ``labels`` are unshifted (the target of position ``t`` is ``labels[:, t + 1]``);
    otherwise they are shifted already, and ``drop_last`` drops the last position (it predicts past the row)."""
    if logits.ndim != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"`logits` must be [B, T, V] and `labels` [B, T], got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    elif drop_last:
        logits, labels = logits[:, :-1], labels[:, :-1]
    b, t = labels.shape
    ce = F.cross_entropy(
        logits.reshape(b * t, -1).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(b, t)
    return ce, labels != IGNORE_INDEX


def packed_labels(
    input_ids: torch.Tensor, token_domain: torch.Tensor, position_ids: torch.Tensor | None
) -> torch.Tensor:
    """Labels for a packed batch: the input ids, ``-100`` at padding (``token_domain < 0``) and at the first
    token of every segment (``position_ids == 0``: a document start, or a row start), so no token is predicted
    from another document.

    Example:
        >>> ids = torch.tensor([[5, 6, 7, 8, 9]])
        >>> packed_labels(ids, torch.tensor([[0, 0, 1, 1, -1]]), torch.tensor([[0, 1, 0, 1, 0]])).tolist()
        [[-100, 6, -100, 8, -100]]
    """
    if input_ids.shape != token_domain.shape or (position_ids is not None and position_ids.shape != input_ids.shape):
        shapes = [tuple(x.shape) for x in (input_ids, token_domain, position_ids) if x is not None]
        raise ValueError(
            f"a packed batch's ids, `token_domain` and `position_ids` must share one [B, T] shape: {shapes}"
        )
    labels = input_ids.clone()
    ignore = token_domain < 0
    if position_ids is not None:
        ignore |= position_ids == 0
    return labels.masked_fill(ignore, IGNORE_INDEX)
