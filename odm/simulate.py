"""A loss-curve simulator with no model: run any policy through a real :class:`~odm.OnlineMixer` in seconds.

Each domain ``i`` follows a power law in the *effective* number of samples it has been trained on, with an
irreducible floor; training on one domain may help others through a transfer matrix ``T``:

    n_i = Σ_j T_ij · s_j                         (s_j: samples of domain j trained on so far, T_ii = 1)
    L_i = E_i + A_i · (1 + n_i / n_0)^(−α_i)     (E_i floor, A_i reducible loss, α_i exponent, n_0 horizon)

A training batch reports per-sample losses ``L_i + σ·ε`` (``ε ~ N(0, 1)``) computed *before* the batch trains
(like a forward pass), then adds its samples to ``s``. A held-out evaluation reports per-domain sums over
``eval_samples`` samples with the same noise. A *pure-noise* domain has ``A_i = 0`` and a high floor, and
transfers nothing to the others: its loss never falls — a policy that chases high loss keeps feeding it.

The shape follows the data-mixing scaling laws of Ye et al. 2024 ("Data Mixing Laws") and the per-domain
power laws ADO fits (Jiang et al. 2024); it is a toy for comparing policies, not a prediction of a real run.

Example:
    >>> result = simulate("uniform", steps=200, simulator=LossSimulator.demo(), seed=0)
    >>> result.proportions.shape, result.eval_loss.shape
    ((200, 4), (200, 4))
    >>> bool(result.eval_loss[-1, 0] < result.eval_loss[0, 0])  # "easy" gets learned
    True
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from odm._checks import check_int
from odm.mixer import OnlineMixer
from odm.policies import Policy

__all__ = ["LossSimulator", "SimulationResult", "simulate"]

GRANULARITIES = ("sample", "batch")


def _per_domain(value: Any, k: int, name: str, *, positive: bool = False) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim == 0:
        arr = np.full(k, float(arr))
    if arr.shape != (k,):
        raise ValueError(f"`{name}` must be one number or {k} numbers (one per domain), got {value!r}")
    if not np.all(np.isfinite(arr)) or np.any(arr <= 0 if positive else arr < 0):
        raise ValueError(f"`{name}` must be finite and {'> 0' if positive else '>= 0'}, got {value!r}")
    return arr


class LossSimulator:
    """Per-domain power-law loss curves with floors, cross-domain transfer and noise (see the module docstring).

    Args:
        domains: domain names, or their number (named ``d0, d1, …``).
        floor: irreducible loss ``E_i`` (one number or one per domain), ``>= 0``.
        scale: reducible loss at the start ``A_i``, ``>= 0``.
        exponent: power-law exponent ``α_i``, ``> 0``.
        horizon: ``n_0``, the sample scale: after ``n_0`` effective samples the reducible part is ``A_i·2^(−α_i)``.
        transfer: ``(K, K)`` matrix ``T`` with ``T_ij`` the effective samples of ``i`` one sample of ``j`` gives
            (non-negative); default the identity (no transfer).
        noise: per-sample standard deviation ``σ`` of the observed losses, ``>= 0``.
        noise_domains: names (or indices) of pure-noise domains: constant loss ``noise_loss``, no learning and
            no transfer to or from them.
        noise_loss: their loss; default ``max_i(E_i + A_i) + 1`` (above every learnable domain's).
        eval_samples: held-out samples per domain in an evaluation.
        seed: seeds the noise.

    Raises:
        ValueError: for an argument outside the ranges above or of the wrong shape, or an unknown noise domain.
    """

    def __init__(
        self,
        domains: int | Sequence[str] = 4,
        *,
        floor: float | Sequence[float] = 1.0,
        scale: float | Sequence[float] = 2.0,
        exponent: float | Sequence[float] = 0.5,
        horizon: float = 1000.0,
        transfer: Any = None,
        noise: float = 0.2,
        noise_domains: Sequence[str | int] = (),
        noise_loss: float | None = None,
        eval_samples: int = 64,
        seed: int = 0,
    ) -> None:
        if isinstance(domains, int):
            if domains < 1:
                raise ValueError(f"`domains` must be at least 1 domain, got {domains}")
            self.domains = [f"d{i}" for i in range(domains)]
        else:
            self.domains = list(domains)
        if not self.domains or len(set(self.domains)) != len(self.domains):
            raise ValueError(f"`domains` must be distinct names, got {domains!r}")
        k = len(self.domains)
        self.floor = _per_domain(floor, k, "floor")
        self.scale = _per_domain(scale, k, "scale")
        self.exponent = _per_domain(exponent, k, "exponent", positive=True)
        if not (np.isfinite(horizon) and horizon > 0):
            raise ValueError(f"`horizon` must be a finite number of samples > 0, got {horizon!r}")
        self.horizon = float(horizon)
        t = np.eye(k) if transfer is None else np.array(transfer, dtype=np.float64)
        if t.shape != (k, k) or not np.all(np.isfinite(t)) or np.any(t < 0):
            raise ValueError(f"`transfer` must be a non-negative finite ({k}, {k}) matrix, got shape {t.shape}")
        if not (np.isfinite(noise) and noise >= 0):
            raise ValueError(f"`noise` must be a finite standard deviation >= 0, got {noise!r}")
        self.noise = float(noise)
        self.eval_samples = check_int(eval_samples, "eval_samples", low=1)
        idx = []
        for d in noise_domains:
            if isinstance(d, int | np.integer) and not isinstance(d, bool) and 0 <= d < k:
                idx.append(int(d))
            elif d in self.domains:
                idx.append(self.domains.index(str(d)))
            else:
                raise ValueError(f"`noise_domains` names unknown domain {d!r}; the domains are {self.domains}")
        self.noise_domains = sorted(set(idx))
        if self.noise_domains:
            level = float(np.max(self.floor + self.scale) + 1.0) if noise_loss is None else float(noise_loss)
            self.floor[self.noise_domains] = level
            self.scale[self.noise_domains] = 0.0
            t[self.noise_domains, :] = 0.0
            t[:, self.noise_domains] = 0.0
            t[self.noise_domains, self.noise_domains] = 1.0
        self.transfer = t
        self.seed = seed
        self.reset(seed)

    @classmethod
    def demo(cls, *, seed: int = 0) -> LossSimulator:
        """Four domains: ``easy`` (falls fast to a low floor), ``medium``, ``hard`` (slow, high floor) and
        ``noise`` (pure noise); the learnable three help each other a little."""
        transfer = np.array([[1.0, 0.2, 0.1, 0.0], [0.2, 1.0, 0.2, 0.0], [0.1, 0.2, 1.0, 0.0], [0, 0, 0, 1.0]])
        return cls(
            ["easy", "medium", "hard", "noise"],
            floor=[0.5, 1.0, 1.8, 0.0],
            scale=[2.5, 2.5, 2.0, 0.0],
            exponent=[0.7, 0.5, 0.35, 0.5],
            horizon=800.0,
            transfer=transfer,
            noise=0.3,
            noise_domains=["noise"],
            seed=seed,
        )

    @property
    def num_domains(self) -> int:
        return len(self.domains)

    def reset(self, seed: int | None = None) -> None:
        """Forgets all training (``s = 0``) and reseeds the noise (with ``seed``, else the constructor's)."""
        self.trained = np.zeros(self.num_domains)
        self._rng = np.random.default_rng(self.seed if seed is None else seed)

    def expected_loss(self, trained: np.ndarray | None = None) -> np.ndarray:
        """``L_i`` (noise-free) after ``trained`` samples per domain (default: what has been trained so far)."""
        s = self.trained if trained is None else np.asarray(trained, dtype=np.float64)
        n = self.transfer @ s
        return self.floor + self.scale * (1.0 + n / self.horizon) ** (-self.exponent)

    def train(self, ids: np.ndarray) -> np.ndarray:
        """Per-sample training losses of a batch with domain ids ``ids``; then trains on the batch.

        Raises:
            ValueError: for ids outside ``[0, K)``.
        """
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_domains):
            raise ValueError(f"domain ids must be in [0, {self.num_domains - 1}], got {ids.min()}..{ids.max()}")
        losses = self.expected_loss()[ids] + self.noise * self._rng.standard_normal(ids.size)
        self.trained += np.bincount(ids, minlength=self.num_domains)
        return losses

    def evaluate(self) -> tuple[np.ndarray, np.ndarray]:
        """Held-out ``(loss_sum, count)`` per domain over ``eval_samples`` samples each (for ``observe_eval``)."""
        m = self.eval_samples
        sums = m * self.expected_loss() + self.noise * np.sqrt(m) * self._rng.standard_normal(self.num_domains)
        return sums, np.full(self.num_domains, float(m))


@dataclasses.dataclass(frozen=True)
class SimulationResult:
    """Trajectories of one simulated run (``T`` steps, ``K`` domains).

    Attributes:
        domains: domain names.
        proportions: ``(T, K)`` proportions each step's batch was drawn under.
        counts: ``(T, K)`` samples of each domain in each step's batch.
        train_loss: ``(T, K)`` mean observed training loss per domain and step (NaN where not drawn).
        eval_loss: ``(T, K)`` noise-free held-out loss after each step.
        num_evals: held-out evaluations the policy asked for (each costs ``K·eval_samples`` samples).
        mixer: the mixer at the end of the run (``mixer.export_schedule()``, ``mixer.policy``).
    """

    domains: list[str]
    proportions: np.ndarray
    counts: np.ndarray
    train_loss: np.ndarray
    eval_loss: np.ndarray
    num_evals: int
    mixer: OnlineMixer

    @property
    def final_eval_loss(self) -> dict[str, float]:
        """``{domain: held-out loss}`` at the end of the run."""
        return dict(zip(self.domains, self.eval_loss[-1].tolist()))


def simulate(
    policy: str | Policy,
    *,
    steps: int = 1000,
    batch_size: int = 32,
    simulator: LossSimulator | None = None,
    granularity: str = "sample",
    seed: int = 0,
    **mixer_kwargs: Any,
) -> SimulationResult:
    """Trains the simulator for ``steps`` batches drawn by an :class:`OnlineMixer` running ``policy``.

    Each step draws ``batch_size`` domain ids from the mixer's proportions (``granularity="batch"``: one
    domain per batch, as ODM pulls one arm per micro-batch), trains the simulator on them, feeds the per-sample
    losses to ``mixer.observe`` and, whenever ``mixer.wants_eval()``, a held-out evaluation to
    ``mixer.observe_eval``; then ``mixer.step()``.

    Args:
        policy: a policy name or instance (an instance is copied, so it can be reused for another run).
        steps: training steps (batches).
        batch_size: samples per batch.
        simulator: the loss curves; default :meth:`LossSimulator.demo`. It is reset (and reseeded with ``seed``)
            first and holds the end state after the run.
        granularity: ``"sample"`` or ``"batch"``.
        seed: seeds the mixer's draws and the simulator's noise; equal seeds give equal results.
        **mixer_kwargs: passed to :class:`OnlineMixer` (``update_every``, ``floors``, …).

    Raises:
        ValueError: for non-positive ``steps`` or ``batch_size`` or an unknown ``granularity``.
    """
    steps, batch_size = check_int(steps, "steps", low=1), check_int(batch_size, "batch_size", low=1)
    if granularity not in GRANULARITIES:
        raise ValueError(f"`granularity` must be one of {GRANULARITIES}, got {granularity!r}")
    sim = LossSimulator.demo() if simulator is None else simulator
    sim.reset(seed)
    if isinstance(policy, Policy):
        policy = copy.deepcopy(policy)
    mixer = OnlineMixer(sim.domains, policy, seed=seed, **mixer_kwargs)
    k = sim.num_domains
    proportions = np.empty((steps, k))
    counts = np.empty((steps, k))
    train_loss = np.empty((steps, k))
    eval_loss = np.empty((steps, k))
    num_evals = 0
    for t in range(steps):
        proportions[t] = mixer.proportions
        ids = mixer.sample(batch_size) if granularity == "sample" else np.repeat(mixer.sample(1), batch_size)
        losses = sim.train(ids)
        mixer.observe(ids, losses)  # drawn under the newest proportions: no batch index needed
        if mixer.wants_eval():
            mixer.observe_eval(*sim.evaluate())
            num_evals += 1
        mixer.step()
        counts[t] = np.bincount(ids, minlength=k)
        with np.errstate(invalid="ignore", divide="ignore"):
            train_loss[t] = np.bincount(ids, losses, minlength=k) / counts[t]
        eval_loss[t] = sim.expected_loss()
    return SimulationResult(
        domains=list(sim.domains),
        proportions=proportions,
        counts=counts,
        train_loss=train_loss,
        eval_loss=eval_loss,
        num_evals=num_evals,
        mixer=mixer,
    )
