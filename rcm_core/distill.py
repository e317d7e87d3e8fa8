"""The rCM distillation step: L_rCM = L_sCM + lambda * L_DMD, alternating with fake-score updates.

One `train_step` (rCM, arXiv 2510.08431, Sec. 3):
  1. critic: `critic_ratio` flow-matching updates of the fake score on fresh student rollouts (no grad);
  2. student: sCM on data noised at log-normal times (JVP of the student along the CFG teacher's ODE),
     plus lambda * DMD on a rollout of N ~ U{1..N_max} steps with gradient through the last step only;
  3. EMA update.
sCM-only and DMD-only are this code with one weight set to zero. All randomness comes from one
torch.Generator whose state is checkpointed, so a resumed run reproduces the next step exactly.

Under torch.distributed (rcm_core.parallel) every rank runs this same code on the same global batch with the
same generator; only the networks are distributed (`copy_net` builds sharded ones), and they return full,
gathered outputs, so losses and metrics are identical on all ranks.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.tensor import DTensor

from rcm_core import trigflow
from rcm_core.config import DistillConfig
from rcm_core.ema import PowerFunctionEMA
from rcm_core.losses.dmd import dmd_loss, fake_score_loss, rollout, rollout_times
from rcm_core.losses.scm import scm_loss, tangent_warmup
from rcm_core.models.flow import FlowModel, guided_f


class StepMetrics(Mapping[str, float]):
    """One step's metrics, read from the device only when looked at.

    The losses keep their metrics as device tensors, so reading metrics costs one host sync per log line
    instead of several per step. (A step still syncs where it needs a host value: the rollout's step count is
    drawn from the device generator.)
    """

    def __init__(self, values: dict[str, torch.Tensor | float]):
        self._values = values

    def __getitem__(self, key: str) -> float:
        value = self._values[key]
        if isinstance(value, torch.Tensor):
            value = self._values[key] = float(value.item())
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __contains__(self, key: object) -> bool:  # without reading the value (Mapping's default would)
        return key in self._values

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"StepMetrics({dict(self)!r})"


class Distiller(Stateful):
    """Owns the student, its EMA, the frozen teacher, the fake score and their optimizers."""

    def __init__(
        self,
        config: DistillConfig,
        teacher_net: torch.nn.Module,
        task,
        *,
        parameterization: str,
        copy_net: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
        device: torch.device | str | None = None,
        autocast: bool = False,
    ):
        """
        Args:
            teacher_net: the teacher network; student and fake score start as copies of it.
            task: draws data and conditions (`sample`, `sample_cond`, `null_cond`, `sample_shape`).
            copy_net: builds an independent network holding teacher_net's weights (default: a deep copy, and the
                teacher is used as it is). rcm_core.parallel passes one that builds a sharded copy, used for the
                teacher too.
            device: where the generator draws its random tensors (the networks' device; default CPU).
            autocast: run the losses under bf16 autocast on the generator's device (CUDA; the time path and the
                norms stay float32, parameters and optimizer state stay float32).
        """
        self.autocast = autocast
        self.config = config
        self.task = task
        param = parameterization
        teacher = teacher_net if copy_net is None else copy_net(teacher_net)
        in_place = copy_net is None  # one process, networks as built (no sharding)
        copy_net = copy_net or copy.deepcopy
        self.teacher = FlowModel(teacher, param).eval().requires_grad_(False)
        # The unsharded network the student is a copy of: the teacher's, or (LoRA) a tree sharing the teacher's
        # weights with adapters added and only those trainable (rcm_core.teachers.lora); full copies of sharded students
        # (evaluation, export) are built from it.
        self.student_template = teacher_net
        self.lora = config.student.lora
        if self.lora is not None:
            from rcm_core.teachers.lora import with_adapters

            # A's random init from the training seed alone: the same on every rank (each takes its shard of this
            # full copy) and in a resumed run, whatever the global RNG has drawn before
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.train.seed)
                self.student_template = with_adapters(teacher_net, self.lora)
        # One process with LoRA: the student is the template itself and its EMA a copy of its adapters alone, so
        # both share the teacher's frozen base tensors (two copies of the model fewer); sharded, copy_net copies.
        copy_student = share_frozen if in_place and self.lora is not None else copy_net
        self.student = FlowModel(
            self.student_template if in_place and self.lora is not None else copy_net(self.student_template), param
        ).train()
        if self.lora is None:
            self.student.requires_grad_(True)
        else:  # copy_net keeps requires_grad; say it again for a copy that would not
            for name, p in self.student.named_parameters():
                p.requires_grad_(".lora_A." in name or ".lora_B." in name)
        # The EMA starts as a copy of the student, made by copy_net: a sharded module cannot be deep-copied.
        average = FlowModel(copy_student(self.student_template), param)
        self.ema = PowerFunctionEMA(self.student, config.optim.ema_sigma_rel, average=average)
        o = config.optim
        betas = (o.beta1, o.beta2)
        trained = [p for p in self.student.parameters() if p.requires_grad]  # LoRA: the adapters alone
        self.opt = torch.optim.AdamW(trained, lr=o.lr, betas=betas, weight_decay=o.weight_decay)
        self.fake: FlowModel | None = None
        self.fake_opt: torch.optim.Optimizer | None = None
        if config.loss.dmd_weight > 0:
            # The fake score starts as the teacher: at step 0 it models the teacher, not the student.
            self.fake = FlowModel(copy_net(teacher_net), param).train().requires_grad_(True)
            self.fake_opt = torch.optim.AdamW(self.fake.parameters(), lr=o.fake_lr, betas=betas, weight_decay=0.0)
        self.generator = torch.Generator(device=device or "cpu").manual_seed(config.train.seed)
        self.step = 0
        # False: checkpoints are read for evaluation only, without the random streams (a CUDA generator's state
        # cannot be restored into a CPU one, so a GPU-trained student can still be evaluated on a CPU).
        self.restore_rng = True

    # ------------------------------------------------------------------------------------------ helpers
    def _teacher_fn(self, cond):
        null = self.task.null_cond(_batch_size(cond))
        w = self.config.teacher.guidance_scale
        return lambda x, t: guided_f(self.teacher, x, t, cond, null, w)

    def _student_rollout(self, cond, *, with_grad: bool) -> torch.Tensor:
        lc, gen, b = self.config.loss, self.generator, _batch_size(cond)
        num_steps = int(torch.randint(1, lc.max_rollout_steps + 1, (1,), generator=gen, device=gen.device))
        times = rollout_times(num_steps, b, lc, generator=gen, device=gen.device)
        noise = torch.randn((b, *self.task.sample_shape), generator=gen, device=gen.device)
        with torch.set_grad_enabled(with_grad):
            return rollout(lambda x, t: self.student(x, t, cond), noise, times, generator=gen)

    def _dmd_times(self, b: int) -> torch.Tensor:
        lc = self.config.loss
        gen = self.generator
        return trigflow.sample_uniform_rf_time(b, lc.dmd_s_min, lc.dmd_s_max, generator=gen, device=gen.device)

    def _critic_step(self) -> dict[str, torch.Tensor]:
        assert self.fake is not None and self.fake_opt is not None
        b, gen = self.config.train.batch_size, self.generator
        cond = self.task.sample_cond(b, generator=gen)
        x0_student = self._student_rollout(cond, with_grad=False)
        eps = torch.randn(x0_student.shape, generator=gen, device=gen.device)
        loss, metrics = fake_score_loss(self.fake, x0_student, cond, t=self._dmd_times(b), eps=eps)
        self.fake_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.fake_opt.step()
        return metrics

    # ------------------------------------------------------------------------------------------ step
    def train_step(self) -> StepMetrics:
        """One student update (preceded by `critic_ratio` fake-score updates when DMD is on).

        Returns the step's metrics; reading one waits for the GPU (see StepMetrics), so read them only to log.
        `step_seconds` is host time, which is the step's time once the GPU keeps up (or on a CPU).
        """
        cfg, gen = self.config, self.generator
        lc, b = cfg.loss, cfg.train.batch_size
        start = time.perf_counter()
        metrics: dict[str, torch.Tensor | float] = {}

        def amp():
            return torch.autocast(self.generator.device.type, dtype=torch.bfloat16, enabled=self.autocast)

        if self.fake is not None:
            for _ in range(lc.critic_ratio):
                with amp():
                    metrics.update(self._critic_step())

        x0, cond = self.task.sample(b, generator=gen)
        total = torch.zeros((), device=gen.device)
        with amp():
            total = self._student_losses(x0, cond, total, metrics)

        self.opt.zero_grad(set_to_none=True)
        total.backward()
        self._set_lr()
        if cfg.optim.grad_clip > 0:
            trained = [p for p in self.student.parameters() if p.requires_grad]
            gnorm = torch.nn.utils.clip_grad_norm_(trained, cfg.optim.grad_clip)
            # a sharded student's norm is a DTensor: make it a plain tensor on every rank now, so that reading it
            # later on rank 0 alone can never start a collective the other ranks do not join
            metrics["grad_norm"] = gnorm.full_tensor() if isinstance(gnorm, DTensor) else gnorm
        self.opt.step()
        self.ema.update(self.student)
        self.step += 1
        metrics.update({"loss": total.detach(), "step_seconds": time.perf_counter() - start})
        return StepMetrics(metrics)

    def _student_losses(self, x0, cond, total: torch.Tensor, metrics: dict) -> torch.Tensor:
        """lambda-weighted L_sCM + L_DMD of the student on (x0, cond)."""
        lc, gen, b = self.config.loss, self.generator, self.config.train.batch_size
        if lc.scm_weight > 0:
            t = trigflow.sample_lognormal_time(b, lc.p_mean, lc.p_std, generator=gen, device=gen.device)
            eps = torch.randn(x0.shape, generator=gen, device=gen.device)
            r = tangent_warmup(self.step, lc.tangent_warmup_steps)
            loss_scm, m = scm_loss(self.student, self._teacher_fn(cond), x0, cond, t=t, eps=eps, r=r, config=lc)
            total = total + lc.scm_weight * loss_scm
            metrics.update(m)
        if lc.dmd_weight > 0:
            assert self.fake is not None
            x0_student = self._student_rollout(cond, with_grad=True)
            eps = torch.randn(x0_student.shape, generator=gen, device=gen.device)
            fake_fn = lambda x, t: self.fake(x, t, cond)  # noqa: E731
            loss_dmd, m = dmd_loss(x0_student, self._teacher_fn(cond), fake_fn, t=self._dmd_times(b), eps=eps)
            total = total + lc.dmd_weight * loss_dmd
            metrics.update(m)
        return total

    def _set_lr(self) -> None:
        """Learning rate from the step alone (no scheduler state to checkpoint)."""
        o, frac = self.config.optim, min(self.step / self.config.train.steps, 1.0)
        scale = 1.0 if o.lr_schedule == "constant" else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))
        for group in self.opt.param_groups:
            group["lr"] = o.lr * scale

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "student": self._student_state(),
            "ema": self.ema.state_dict(),
            # get_optimizer_state_dict initialises empty optimizer state on load, so DCP can fill it in place
            "opt": get_optimizer_state_dict(self.student, self.opt),
            "step": self.step,
        }
        if self.restore_rng:
            state["generator"] = self.generator.get_state()
            state["torch_rng"] = torch.get_rng_state()
        if self.fake is not None and self.fake_opt is not None:
            state["fake"] = get_model_state_dict(self.fake)
            state["fake_opt"] = get_optimizer_state_dict(self.fake, self.fake_opt)
        if hasattr(self.task, "position_state"):  # a streamed dataset: where each rank's reader is (a collective)
            state["data_position"] = self.task.position_state()
        return state

    def _student_state(self) -> dict[str, Any]:
        """The student's weights for a checkpoint: all of them, or (LoRA) the adapters alone (the frozen base
        weights are the teacher's, loaded again at every start)."""
        state = get_model_state_dict(self.student)
        return state if self.lora is None else {k: v for k, v in state.items() if k in self._trained_names()}

    def _trained_names(self) -> set[str]:
        return {n for n, p in self.student.named_parameters() if p.requires_grad}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        strict = StateDictOptions(strict=self.lora is None)  # LoRA: adapters only, checked by the keys below
        if self.lora is not None and set(state["student"]) != self._trained_names():
            raise ValueError("the checkpoint's student is not this job's LoRA student (other adapters)")
        set_model_state_dict(self.student, state["student"], options=strict)
        self.ema.load_state_dict(state["ema"])
        set_optimizer_state_dict(self.student, self.opt, state["opt"])
        self.step = int(state["step"])
        if self.restore_rng:
            self.generator.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
        if self.fake is not None and self.fake_opt is not None:
            set_model_state_dict(self.fake, state["fake"])
            set_optimizer_state_dict(self.fake, self.fake_opt, state["fake_opt"])
        if "data_position" in state:
            self.task.load_position(state["data_position"])


def _batch_size(cond) -> int:
    """Rows in a condition: a tensor, or a dict of tensors (e.g. {"tokens": (B, Lc, Dc)})."""
    return len(next(iter(cond.values()))) if isinstance(cond, dict) else len(cond)


def share_frozen(net: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of `net` whose frozen parameters (requires_grad False) and buffers are `net`'s own tensors:
    only the trainable ones (a LoRA student's adapters) are copied."""
    memo: dict[int, Any] = {id(b): b for b in net.buffers()}
    memo |= {id(p): p for p in net.parameters() if not p.requires_grad}
    return copy.deepcopy(net, memo)
