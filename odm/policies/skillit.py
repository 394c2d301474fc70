"""Skill-It, online: weight each domain by how much training on it lowers the held-out losses of the others.

Chen et al. 2023, "Skill-it! A Data-Driven Skills Framework for Understanding and Training Language Models".
See ``docs/algorithms.md``, "Skill-It, online".
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from odm._checks import check_float, check_int
from odm.policies.base import EVAL_LOSS, DomainStats, Policy, check_proportions

__all__ = ["SkillIt", "estimate_skill_graph", "skillit_proportions"]


def skillit_proportions(prior: np.ndarray, graph: np.ndarray, eval_losses: np.ndarray, eta: float) -> np.ndarray:
    """``p ∝ p0 ⊙ exp(η·A·Σ_w L_eval)`` for the ``(w, K)`` held-out losses of the window."""
    with np.errstate(divide="ignore"):
        logits = np.log(prior) + eta * (graph @ eval_losses.sum(axis=0))
    z = np.exp(logits - logits.max())
    return z / z.sum()


def estimate_skill_graph(
    probe: Callable[[int], Sequence[float] | np.ndarray],
    initial_loss: Sequence[float] | np.ndarray,
    *,
    nonnegative: bool = True,
) -> np.ndarray:
    """Estimates the skills graph from short single-domain probes.

    ``A[i, j] = (L_j − L_j^{(i)}) / L_j``: the relative drop of domain ``j``'s held-out loss after training on
    domain ``i`` only, from the same starting point ``L`` (``initial_loss``). The caller's ``probe(i)`` restores
    the starting model (e.g. from a checkpoint), trains a few steps on domain ``i`` alone (e.g. with
    ``odm.policies.Fixed`` one-hot proportions), evaluates and returns the per-domain held-out losses; it is
    called once per domain, in order. Skill-It's graphs keep only non-negative transfer (``nonnegative``).

    Args:
        probe: ``i -> (K,)`` per-domain held-out losses after training on domain ``i`` only.
        initial_loss: ``(K,)`` per-domain held-out losses of the starting model (positive).
        nonnegative: clip negative entries (training on ``i`` hurt ``j``) to 0.

    Returns:
        The ``(K, K)`` graph ``A`` for :class:`SkillIt`.

    Raises:
        ValueError: non-positive or non-finite initial losses, or a probe returning the wrong shape or a
            non-finite loss.

    Example:
        >>> after = {0: [0.5, 1.5], 1: [1.0, 1.0]}
        >>> estimate_skill_graph(lambda i: after[i], [1.0, 2.0]).tolist()
        [[0.5, 0.25], [0.0, 0.5]]
    """
    base = np.asarray(initial_loss, dtype=np.float64)
    if base.ndim != 1 or not np.all(np.isfinite(base)) or np.any(base <= 0):
        raise ValueError(f"`initial_loss` must be a 1-D sequence of finite positive losses, got {initial_loss!r}")
    k = base.shape[0]
    graph = np.empty((k, k))
    for i in range(k):
        after = np.asarray(probe(i), dtype=np.float64)
        if after.shape != (k,) or not np.all(np.isfinite(after)):
            raise ValueError(f"`probe({i})` must return {k} finite losses, got {after!r}")
        graph[i] = (base - after) / base
    return np.maximum(graph, 0.0) if nonnegative else graph


class SkillIt(Policy):
    """Online Skill-It: ``p ∝ p0 ⊙ exp(η·A·Σ_{last w evals} L_eval)``.

    Every ``eval_every`` updates the policy asks for a held-out evaluation (:meth:`wants_eval`); the
    proportions are recomputed from the last ``window`` evaluations (non-cumulative: only the window counts).
    ``A[i, j]`` says how much training on domain ``i`` lowers domain ``j``'s held-out loss, so a domain scores
    high when it helps domains whose loss is still high. Before the first evaluation ``p ∝ p0 ⊙ exp(η·A·1)``
    (every loss taken as 1, as the authors' code starts).

    Args:
        graph: the ``(K, K)`` skills graph; default the identity (each domain helps only itself). Estimate one
            with :func:`estimate_skill_graph`.
        eta: ``η > 0``, the temperature.
        window: ``w``, evaluations summed.
        prior: ``p0`` (default uniform).
        eval_every: updates between evaluations.

    Example:
        >>> policy = SkillIt(eta=1.0, eval_every=1).bind(2)
        >>> ones = np.ones(2)
        >>> policy.update(DomainStats(ones, ones, ones / 2, step=1, eval_loss=np.array([2.0, 1.0])))
        >>> policy.proportions.round(3)
        array([0.731, 0.269])
    """

    name = "skillit"
    requires = frozenset({EVAL_LOSS})

    def __init__(
        self,
        graph: Sequence[Sequence[float]] | np.ndarray | None = None,
        *,
        eta: float = 0.5,
        window: int = 3,
        prior: Sequence[float] | np.ndarray | None = None,
        eval_every: int = 100,
    ) -> None:
        super().__init__()
        self.eta = check_float(eta, "eta", low=0, low_open=True)
        self.window = check_int(window, "window", low=1)
        self.eval_every = check_int(eval_every, "eval_every", low=1)
        self.graph: np.ndarray | None = None
        if graph is not None:
            g = np.asarray(graph, dtype=np.float64)
            if g.ndim != 2 or g.shape[0] != g.shape[1] or not np.all(np.isfinite(g)):
                raise ValueError(f"`graph` must be a finite square (K, K) matrix, got shape {g.shape}")
            self.graph = g
        self.prior = None if prior is None else check_proportions(prior, name="prior")
        self._bind_from(graph=self.graph, prior=self.prior)

    def _init_state(self, num_domains: int) -> None:
        if self.graph is not None and self.graph.shape[0] != num_domains:
            raise ValueError(f"`graph` is {self.graph.shape[0]}x{self.graph.shape[0]}, the mixer has {num_domains}")
        self._graph = self.graph if self.graph is not None else np.eye(num_domains)
        self._p0 = self.prior if self.prior is not None else np.full(num_domains, 1.0 / num_domains)
        # Before any evaluation the authors' code uses a loss of 1 for every domain: p ∝ p0 ⊙ exp(η·A·1).
        self._p = skillit_proportions(self._p0, self._graph, np.ones((1, num_domains)), self.eta)
        self._evals: deque[np.ndarray] = deque(maxlen=self.window)

    def _get_state(self) -> dict[str, Any]:
        return {"evals": [e.tolist() for e in self._evals]}

    def _set_state(self, state: dict[str, Any]) -> None:
        self._evals = deque((np.array(e, dtype=np.float64) for e in state["evals"]), maxlen=self.window)

    def wants_eval(self, step: int) -> bool:
        return step % self.eval_every == 0

    def update(self, stats: DomainStats) -> None:
        k = self.num_domains
        if stats.num_domains != k:
            raise ValueError(f"stats have {stats.num_domains} domains, the policy has {k}")
        ev = self._eval_loss(stats)
        if ev is None:
            return
        self._evals.append(ev)
        self._p = skillit_proportions(self._p0, self._graph, np.stack(list(self._evals)), self.eta)
