"""Distiller: train a student network on a frozen teacher's soft targets with :func:`kd_loss`.

The teacher runs in eval mode under ``torch.no_grad`` (its parameters are frozen; it never gets
gradients). The student is trained on mini-batches drawn with the distiller's own generator, so a
run resumed from a checkpoint continues exactly: student, optimizer, step count, running loss and
every random state (global torch CPU/CUDA and the batch sampler) are restored.

Under torchrun (a process group from metafast.distributed) every rank draws the same batch indices
(same sampler seed) and computes the loss on its own contiguous shard of the rows; the gradients are
averaged so that each rank takes the optimizer step one process would take on the whole batch. The
batch stream does not depend on the world size, so a run resumes with any number of processes. Rank 0
alone writes checkpoints; Ctrl-C on any rank travels in the gradient all_reduce, so every rank stops
after the same step.
"""
import os
from typing import Dict, Optional

import torch
from torch import Tensor, nn

from .. import distributed
from ..functional.modes import eval_mode
from ..ops.kd_loss import check_args, kd_loss
from ..runtime.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from ..runtime.interrupt import DeferredInterrupt
from ..runtime.progress import RunningLoss, progress_bar

__all__ = ["Distiller", "DistillInterrupted", "accuracy"]


class DistillInterrupted(Exception):
    """Raised after Ctrl-C; ``checkpoint`` is the saved checkpoint (None if none could be saved)."""

    def __init__(self, message: str, out_dir: Optional[str], step: int, checkpoint: Optional[str]):
        super().__init__(message)
        self.out_dir, self.step, self.checkpoint = out_dir, step, checkpoint


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 4096) -> float:
    """Top-1 accuracy of ``model`` on (x, y) in eval mode; the model's train/eval mode is restored."""
    correct = 0
    with eval_mode(model):
        for i in range(0, x.shape[0], batch_size):
            correct += int((model(x[i:i + batch_size]).argmax(-1) == y[i:i + batch_size]).sum())
    return correct / max(x.shape[0], 1)


class Distiller:
    """Knowledge distillation from ``teacher`` into ``student``.

    Args:
        teacher: the trained network; frozen here (eval mode, requires_grad False).
        student: the network to train; its outputs must have the teacher's shape [B, C].
        optimizer: for the student's parameters (default Adam, ``lr``).
        temperature, alpha: as in :func:`metafast.ops.kd_loss.kd_loss` (alpha weights the KD term,
            1 - alpha the hard-label cross-entropy; without labels alpha scales the KD term alone).
        lr: learning rate of the default optimizer.
        seed: seed of the mini-batch sampler.
        backend: kd_loss backend (None: automatic).
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                 temperature: float = 4.0, alpha: float = 0.9, lr: float = 1e-3, seed: int = 0,
                 backend: Optional[str] = None):
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher: expected an nn.Module, got {type(teacher).__name__}")
        if not isinstance(student, nn.Module):
            raise TypeError(f"student: expected an nn.Module, got {type(student).__name__}")
        if teacher is student:
            raise ValueError("teacher and student must be different modules")
        dummy = torch.zeros(1, 1)
        check_args(dummy, dummy, None, temperature, alpha, "mean")  # clear errors at construction
        if not list(student.parameters()):
            raise ValueError("student: has no parameters to train")
        self.teacher = teacher.eval().requires_grad_(False)
        self.student = student
        self.optimizer = optimizer if optimizer is not None else torch.optim.Adam(student.parameters(), lr=lr)
        self.temperature, self.alpha, self.backend = float(temperature), float(alpha), backend
        self.generator = torch.Generator().manual_seed(seed)  # batch sampling, on the CPU: device independent
        self.step_count = 0
        self.running = RunningLoss()

    # ------------------------------------------------------------------------------ one step
    def loss(self, x: Tensor, y: Optional[Tensor] = None) -> Tensor:
        """The KD loss of the student on one batch (teacher under no_grad, in eval mode)."""
        self.teacher.eval()
        with torch.no_grad():
            t = self.teacher(x)
        return kd_loss(self.student(x), t, y, self.temperature, self.alpha, backend=self.backend)

    def step(self, x: Tensor, y: Optional[Tensor] = None) -> Tensor:
        """One optimizer step of the student on (x, y); returns the detached loss. In a process group
        (x, y) is the whole batch, the same on every rank: each rank computes its shard of the rows,
        and the loss returned is the mean over all rows."""
        return self._step(x, y, False)[0]

    def _step(self, x: Tensor, y: Optional[Tensor], stop: bool):
        """-> (loss, stop): ``stop`` is True when any rank asked to stop (Ctrl-C) during this step."""
        self.student.train()
        world = distributed.world_size()
        self.optimizer.zero_grad(set_to_none=True)
        if world == 1:
            loss = self.loss(x, y)
            loss.backward()
            flag = False
        else:
            n = x.shape[0]
            lo, hi = distributed.shard_bounds(n)
            loss = self.loss(x[lo:hi], None if y is None else y[lo:hi]) * distributed.shard_scale(hi - lo, n)
            loss.backward()
            loss = loss.detach().clone()
            flag_t = torch.full((1,), float(stop), dtype=loss.dtype, device=loss.device)
            distributed.all_reduce_gradients(self.student.parameters(), also=[loss, flag_t])
            flag = bool(flag_t.item() > 0)
        self.optimizer.step()
        self.step_count += 1
        self.running.update(loss)
        return loss.detach(), flag

    # ------------------------------------------------------------------------------ training
    def fit(self, x: Tensor, y: Optional[Tensor] = None, steps: int = 1000, batch_size: int = 128,
            out_dir: Optional[str] = None, checkpoint_every: int = 0, resume: bool = False,
            progress: bool = True, desc: str = "distill") -> Dict[str, float]:
        """Train until ``steps`` optimizer steps in total have been taken, on mini-batches of (x, y)
        drawn uniformly with replacement. With ``out_dir`` a checkpoint is written atomically every
        ``checkpoint_every`` steps (0: only at the end) and on Ctrl-C; ``resume=True`` first loads
        the checkpoint in ``out_dir`` and continues exactly. Returns {"steps", "loss"}."""
        if not isinstance(x, Tensor) or x.dim() < 2 or x.shape[0] == 0:
            raise ValueError(f"x: expected a non-empty tensor [n, ...], got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        if y is not None and (not isinstance(y, Tensor) or tuple(y.shape) != (x.shape[0],)):
            raise ValueError(f"y: expected labels of shape ({x.shape[0]},) or None, got "
                             f"{tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__}")
        for name, v, lo in (("steps", steps, 0), ("batch_size", batch_size, 1), ("checkpoint_every", checkpoint_every, 0)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name}: expected an int >= {lo}, got {v!r}")
        world = distributed.world_size()
        if world > 1 and min(batch_size, x.shape[0]) < world:
            raise ValueError(f"batch_size: a batch of {min(batch_size, x.shape[0])} rows cannot be split across "
                             f"{world} processes")
        main = distributed.is_main()
        progress = progress and main
        ckpt = os.path.join(out_dir, CHECKPOINT_NAME) if out_dir else None
        if resume:
            if ckpt is None:
                raise ValueError("resume=True needs out_dir (the directory holding the checkpoint)")
            self.load_state_dict(load_checkpoint(ckpt))
            if steps < self.step_count:
                raise ValueError(f"steps must be >= {self.step_count} (the checkpoint's step), got {steps}")
        elif ckpt is not None and os.path.exists(ckpt):
            raise ValueError(f"{out_dir} already holds a checkpoint; resume it or pick another output directory")

        def save() -> Optional[str]:
            if ckpt is None:
                return None
            if main:  # every rank holds the same state; one writer
                save_checkpoint(self.state_dict(), ckpt)
            return ckpt

        if world > 1:  # every rank starts from rank 0's student (and teacher)
            distributed.broadcast_parameters(self.student)
            distributed.broadcast_parameters(self.teacher)

        n = x.shape[0]
        bar = progress_bar(steps, initial=self.step_count, desc=desc, enabled=progress)
        at_boundary = False
        try:
            with DeferredInterrupt() as interrupt:
                while self.step_count < steps:
                    if interrupt.requested and world == 1:  # several ranks decide together, below
                        at_boundary = True
                        raise KeyboardInterrupt
                    idx = torch.randint(0, n, (min(batch_size, n),), generator=self.generator).to(x.device)
                    xb, yb = x[idx], None if y is None else y[idx]
                    if world == 1:
                        self.step(xb, yb)
                        stop = False
                    else:
                        _, stop = self._step(xb, yb, interrupt.requested)
                    bar.update(1)
                    if self.step_count % 50 == 0:
                        bar.set_postfix(loss=f"{self.running.value():.4f}", refresh=False)
                    if checkpoint_every and self.step_count % checkpoint_every == 0:
                        save()
                    if stop:
                        at_boundary = True
                        raise KeyboardInterrupt
        except KeyboardInterrupt:
            # Only between steps is the state consistent; a second Ctrl-C inside a step keeps the
            # last checkpoint (if any) instead.
            path = save() if at_boundary else (ckpt if ckpt and os.path.exists(ckpt) else None)
            raise DistillInterrupted(f"interrupted at step {self.step_count}/{steps}"
                                     + (f"; checkpoint saved to {path}" if path else ""),
                                     out_dir, self.step_count, path) from None
        finally:
            bar.close()
        save()
        return {"steps": self.step_count, "loss": self.running.value()}

    # ------------------------------------------------------------------------------ evaluation
    def evaluate(self, x: Tensor, y: Tensor, batch_size: int = 4096) -> Dict[str, float]:
        """Held-out top-1 accuracy of teacher and student, and how often their predictions agree."""
        with torch.no_grad():
            acc_t = accuracy(self.teacher, x, y, batch_size)
            acc_s = accuracy(self.student, x, y, batch_size)
            with eval_mode(self.student):
                agree = sum(int((self.teacher(x[i:i + batch_size]).argmax(-1)
                                 == self.student(x[i:i + batch_size]).argmax(-1)).sum())
                            for i in range(0, x.shape[0], batch_size)) / max(x.shape[0], 1)
        return {"teacher_accuracy": acc_t, "student_accuracy": acc_s, "agreement": agree}

    # ------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        rng = {"torch_cpu": torch.get_rng_state(), "batches": self.generator.get_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["torch_cuda"] = torch.cuda.get_rng_state_all()
        return {"task": "distill", "student": self.student.state_dict(), "optimizer": self.optimizer.state_dict(),
                "step": self.step_count, "running_loss": self.running.state(), "rng": rng,
                "temperature": self.temperature, "alpha": self.alpha}

    def load_state_dict(self, state: dict) -> None:
        if state.get("task") != "distill":
            raise ValueError(f"not a distillation checkpoint (task {state.get('task')!r})")
        if (state["temperature"], state["alpha"]) != (self.temperature, self.alpha):
            raise ValueError(f"the checkpoint was trained with temperature={state['temperature']}, "
                             f"alpha={state['alpha']}; this Distiller has temperature={self.temperature}, "
                             f"alpha={self.alpha}")
        self.student.load_state_dict(state["student"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step_count = int(state["step"])
        self.running = RunningLoss.from_state(state["running_loss"])
        torch.set_rng_state(state["rng"]["torch_cpu"])
        self.generator.set_state(state["rng"]["batches"])
        if "torch_cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["torch_cuda"])
