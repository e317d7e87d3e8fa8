"""The one training loop: `Trainer` runs a Distiller for every entry point (the `rcm` CLI, the Ray Train worker,
scripts/torchrun_rcm.py); each of them keeps only its wiring (arguments, Ray context, process group).

Per step the Trainer calls `Distiller.train_step` (student, EMA and fake-score updates) and, on the steps that
need it:
- log steps (every `train.log_every` and the last): the step's metrics with rate and ETA go to `hooks.log`;
  the cancel hook and the time budget are consulted there, so every rank leaves the loop at the same step;
- evaluation steps (every `train.eval_every`, not the last): `hooks.evaluate(step)`;
- checkpoint steps (every `train.checkpoint_every`, the last, and when stopping): `store.save(...)`, one call
  that writes the full state (networks, optimizers, step, RNG streams) plus the manifest fields below.
Resume: `store.restore(distiller)` loads the latest checkpoint; its manifest carries the training seconds spent
(the time budget spans recoveries) and the recovery count.

Non-finite guard: every step folds "is any loss term or the gradient norm non-finite" into a device flag, read
(one host sync) before anything is logged, evaluated, checkpointed or returned. A non-finite step raises
`NonFiniteError` naming the first bad step and its terms, so no checkpoint of non-finite weights is ever written
(the last finite one survives any rotation) and nothing non-finite reaches an export. Every rank computes the
same full-batch losses (rcm_core.parallel gathers the outputs), so every rank raises at the same step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch

from rcm_core.distill import Distiller, StepMetrics


class NonFiniteError(RuntimeError):
    """A loss term or the gradient norm became NaN/inf; `step` and `terms` say where."""

    def __init__(self, step: int, terms: dict[str, float]):
        self.step, self.terms = step, terms
        listed = ", ".join(f"{k}={v}" for k, v in terms.items())
        super().__init__(f"non-finite training at step {step}: {listed}; no checkpoint of it was written")


class CheckpointStore(Protocol):
    def restore(self, distiller: Distiller) -> dict[str, Any] | None:
        """Load the latest checkpoint into `distiller`; its manifest, or None when there is none."""

    def save(self, distiller: Distiller, extra: dict[str, Any], metrics: dict[str, float]) -> None:
        """Write a checkpoint of `distiller` (every rank calls it); `extra` goes into its manifest."""


def _never() -> bool:
    return False


def _same(flag: bool) -> bool:
    return flag


@dataclass
class TrainHooks:
    """What an entry point plugs into the loop; every callable is called on every rank at the same steps."""

    log: Callable[[int, dict[str, float]], None] = lambda step, metrics: None
    evaluate: Callable[[int], None] | None = None
    cancel_requested: Callable[[], bool] = _never  # e.g. the worker's S3 marker (may differ between ranks)
    # makes a host decision identical on every rank (the worker broadcasts rank 0's); identity in one process
    agree: Callable[[bool], bool] = _same


@dataclass
class TrainResult:
    status: Literal["completed", "time_limit", "cancelled"]
    step: int
    train_seconds: float  # loop wall-clock, summed over recoveries
    recovery_count: int
    losses: list[float] = field(default_factory=list)  # the loss of every step run here (read at the end)
    step_seconds: list[float] = field(default_factory=list)  # host time of every step run here


class _FiniteGuard:
    """Device-side record of the first step whose metrics held a non-finite value (no sync per step)."""

    def __init__(self) -> None:
        self.names: list[str] | None = None
        self.first_step: torch.Tensor | None = None  # -1 while every step was finite
        self.values: torch.Tensor | None = None  # the metrics at that step

    def update(self, step: int, metrics: StepMetrics) -> None:
        tensors = {k: v for k, v in metrics._values.items() if isinstance(v, torch.Tensor)}
        if not tensors:
            return
        names = list(tensors)
        values = torch.stack([v.detach().float().reshape(()) for v in tensors.values()])
        if self.first_step is None or self.names != names:
            if self.first_step is not None:
                self.check()  # the metric set changed: settle the old record first
            self.names = names
            self.first_step = torch.full((), -1, dtype=torch.long, device=values.device)
            self.values = torch.zeros_like(values)
        assert self.values is not None
        newly = (~torch.isfinite(values)).any() & (self.first_step < 0)
        self.first_step = torch.where(newly, torch.full_like(self.first_step, step), self.first_step)
        self.values = torch.where(newly, values, self.values)

    def check(self) -> None:
        if self.first_step is None or self.names is None or self.values is None:
            return
        step = int(self.first_step.item())
        if step >= 0:
            bad = {n: float(v) for n, v in zip(self.names, self.values.tolist(), strict=True) if not math.isfinite(v)}
            raise NonFiniteError(step, bad)


class Trainer:
    """Runs `distiller` to `distiller.config.train.steps` with checkpoints in `store` and the entry point's hooks."""

    def __init__(
        self,
        distiller: Distiller,
        store: CheckpointStore,
        hooks: TrainHooks | None = None,
        *,
        budget_spans_resumes: bool = True,
    ):
        """
        Args:
            budget_spans_resumes: train.max_minutes counts the training time before the checkpoint resumed from
                (a job's recoveries are one run); False: it counts this call only (a new sitting of a local run).
                The manifests record the total either way.
        """
        self.distiller, self.store, self.hooks = distiller, store, hooks or TrainHooks()
        self.budget_spans_resumes = budget_spans_resumes
        self.trained_before = 0.0  # seconds of training before the checkpoint resumed from
        self.recovery_count = 0
        self._guard = _FiniteGuard()

    def resume(self) -> dict[str, Any] | None:
        """Load the latest checkpoint, if any; returns its manifest."""
        manifest = self.store.restore(self.distiller)
        if manifest is not None:
            self.recovery_count = int(manifest.get("recovery_count", 0)) + 1
            self.trained_before = float(manifest.get("train_seconds", 0.0))
        return manifest

    def run(self) -> TrainResult:
        """Train; returns how the loop ended. Raises NonFiniteError (before any non-finite checkpoint)."""
        d, hooks = self.distiller, self.hooks
        cfg = d.config.train
        budget = 60 * cfg.max_minutes
        start, first = time.perf_counter(), d.step
        last_log = (start, first)
        losses: list[torch.Tensor | float] = []
        seconds: list[float] = []

        def spent() -> float:
            return self.trained_before + time.perf_counter() - start

        counted_before = self.trained_before if self.budget_spans_resumes else 0.0
        # a recovery after the budget was spent (e.g. a crash during the export) goes straight to the end
        status: Literal["completed", "time_limit", "cancelled"] = "completed"
        if budget and hooks.agree(counted_before >= budget):
            status = "time_limit"
        while d.step < cfg.steps and status == "completed":
            metrics = d.train_step()
            step = d.step
            self._guard.update(step, metrics)
            losses.append(metrics._values["loss"])
            seconds.append(float(metrics["step_seconds"]))
            last = step == cfg.steps
            if step % cfg.log_every == 0 or last:
                self._guard.check()
                now = time.perf_counter()
                rate = (step - first) / max(now - start, 1e-9)
                # wall time since the last line (reading the metrics waits for the device: GPU time included)
                wall = (now - last_log[0]) / max(step - last_log[1], 1)
                last_log = (now, step)
                hooks.log(
                    step,
                    {
                        **metrics,
                        "step": step,
                        "total": cfg.steps,
                        "steps_per_second": rate,
                        "eta": (cfg.steps - step) / max(rate, 1e-9),
                        "wall_seconds_per_step": wall,
                    },
                )
                if hooks.agree(hooks.cancel_requested()):
                    status = "cancelled"
                elif budget and hooks.agree(counted_before + time.perf_counter() - start >= budget):
                    status = "time_limit"
            if hooks.evaluate is not None and cfg.eval_every and step % cfg.eval_every == 0 and not last:
                if status == "completed":  # a stopping run goes to its checkpoint (and export) instead
                    self._guard.check()
                    hooks.evaluate(step)
            every = cfg.checkpoint_every
            if (every and step % every == 0) or last or status != "completed":
                self._guard.check()
                self.save({"step": step, "loss": float(metrics["loss"])}, spent())
        self._guard.check()
        return TrainResult(
            status=status,
            step=d.step,
            train_seconds=spent(),
            recovery_count=self.recovery_count,
            losses=[float(v) for v in losses],
            step_seconds=seconds,
        )

    def save(self, metrics: dict[str, float], train_seconds: float) -> None:
        extra = {"recovery_count": self.recovery_count, "train_seconds": train_seconds}
        self.store.save(self.distiller, extra, metrics)


def check_finite_state(state: dict[str, torch.Tensor], what: str) -> None:
    """Raise NonFiniteError unless every tensor of `state` is finite (the export's last line of defence)."""
    bad = {k: float("nan") for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()}
    if bad:
        raise NonFiniteError(-1, {f"{what}.{k}": v for k, v in list(bad.items())[:5]})
