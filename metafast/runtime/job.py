"""The job skeleton that the sinusoid, vision, distill and multitask jobs share.

A job subclasses :class:`Job`, names its ``task`` (the checkpoint's "task" field), its config type
and the config fields a resumed run must keep, and writes only what is its own: building the model,
one training step, the checkpoint's contents and the final metrics. The skeleton does the rest the
same way for every job:

- start or resume: a fresh run refuses a directory that already holds one; a resumed one checks that
  the saved run is of the same task with the same fixed settings and not past the iterations asked;
- the training loop: Ctrl-C is deferred to the next step boundary (a second one interrupts at once);
  a checkpoint is written atomically every ``checkpoint_every`` iterations and on Ctrl-C, never
  inside a step, then :class:`TrainingInterrupted` is raised; under torchrun a stop requested on
  any rank is decided after the same step on all of them (the job's step all-reduces the flag);
- the progress bar, the clock behind ``train_seconds`` and the metrics file;
- rank 0 alone prints and writes (every rank holds the same state).
"""
import contextlib
import os
import time
from typing import Callable, Iterator, Optional, Sequence, Tuple, Type

import torch
from tqdm.auto import tqdm

from .. import distributed
from .checkpoint import CHECKPOINT_NAME, load_checkpoint, remove_stale_temp_files, save_checkpoint
from .config import JobConfig
from .interrupt import DeferredInterrupt
from .metrics import write_metrics
from .progress import progress_bar
from .run import TrainingInterrupted, check_fixed, resolve_device


def _quiet(message: str) -> None:
    pass


class Job:
    """One run of a job in ``out_dir``; ``run()`` starts (or with ``resume`` continues) it and returns
    the metrics (None on ranks other than 0 of a distributed run)."""

    task: str = ""                                # the "task" field of the job's checkpoints
    config_type: Type[JobConfig] = JobConfig
    fixed_on_resume: Sequence[str] = ()           # config fields that define the math of a run
    interrupted: Tuple[Type[BaseException], ...] = (TrainingInterrupted,)  # what run() raises on Ctrl-C
    user_errors: Tuple[Type[BaseException], ...] = (ValueError,)  # a bad setup: the command says what
    data_parallel = True                          # joins torchrun's process group

    def __init__(self, config: JobConfig, out_dir: str, resume: bool = False, progress: bool = True,
                 log: Callable[[str], None] = print, callback: Optional[Callable[..., None]] = None,
                 plot: bool = True):
        self.config, self.out_dir, self.resume = config, out_dir, resume
        self.progress, self.log = progress, log
        self.callback = callback                  # after every completed step (the job says with what)
        self.plot = plot                          # write the job's figures, where it has any
        self.checkpoint_path = os.path.join(out_dir, CHECKPOINT_NAME)
        self.state: Optional[dict] = None         # the checkpoint a resumed run continues from
        self.iteration = 0
        self.seconds_before = 0.0                 # training time of the runs this one continues
        self.main, self.world, self.device = True, 1, torch.device("cpu")
        self.bar: Optional[tqdm] = None
        self.interrupt: Optional[DeferredInterrupt] = None
        self._t0 = time.perf_counter()

    # ------------------------------------------------------------------------------ the run
    def run(self) -> Optional[dict]:
        """Validate, join the process group under torchrun (and leave it at the end, also on errors,
        unless the caller already joined), then ``execute`` on this rank's device."""
        self.config.validate()
        device = resolve_device(getattr(self.config, "device", "cpu"))
        if not self.data_parallel:
            return self._execute(device)
        with distributed.session(device.type):
            return self._execute(distributed.device_for(device))

    def _execute(self, device: torch.device) -> Optional[dict]:
        self.main, self.world, self.device = distributed.is_main(), distributed.world_size(), device
        if not self.main:
            self.progress, self.log = False, _quiet
        return self.execute(device)

    def execute(self, device: torch.device) -> Optional[dict]:
        """The job itself, on this rank's ``device``: returns the metrics (None on ranks other than 0)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------ start / resume
    @classmethod
    def read_saved(cls, out_dir: str) -> Tuple[JobConfig, dict]:
        """The saved run in ``out_dir``: its config and checkpoint. Errors say why there is none."""
        state = load_checkpoint(out_dir)
        if state.get("task") != cls.task:
            raise ValueError(f"the checkpoint in {out_dir} is of task {state.get('task')!r}, not {cls.task!r}")
        return cls.config_type.from_dict(state["config"]), state

    @classmethod
    def check_resume(cls, saved: JobConfig, wanted: JobConfig, state: dict) -> None:
        """A resumed run keeps the fixed fields and asks for no fewer iterations than are done."""
        check_fixed(saved, wanted, cls.fixed_on_resume)
        if wanted.iterations < state["iteration"]:
            raise ValueError(f"iterations must be >= {state['iteration']} (the checkpoint's iteration), "
                             f"got {wanted.iterations}")

    @classmethod
    def holds_run(cls, out_dir: str) -> bool:
        return os.path.exists(os.path.join(out_dir, CHECKPOINT_NAME))

    def open(self, create: bool = True) -> Optional[dict]:
        """Check the run can start (fresh: ``out_dir`` holds no run) or continue (resume: the saved run
        matches the config), then (``create``) make ``out_dir`` on rank 0; returns the checkpoint a
        resumed run continues from."""
        if not self.resume:
            if self.holds_run(self.out_dir):
                raise ValueError(f"{self.out_dir} already holds a checkpoint; resume it or pick another "
                                 "output directory")
        else:
            saved, state = self.read_saved(self.out_dir)
            self.check_resume(saved, self.config, state)
            self.state = state
            self.iteration = state.get("iteration", 0)
            self.seconds_before = state.get("train_seconds", 0.0)
        if create and self.main:
            os.makedirs(self.out_dir, exist_ok=True)
        if self.main:  # what a writer killed mid-checkpoint left behind
            for stale in remove_stale_temp_files(self.checkpoint_path):
                self.log(f"removed {stale}, the partial checkpoint of a run killed while writing it")
        return self.state

    # ------------------------------------------------------------------------------ checkpoints, metrics
    def state_dict(self) -> dict:
        """What a checkpoint holds besides task, config, iteration and train_seconds."""
        return {}

    def save(self, path: Optional[str] = None, **fields) -> str:
        """Atomically write a checkpoint (rank 0 only: every rank holds the same state); ``fields``
        add to or replace the job's ``state_dict()``. Returns the path."""
        path = path or self.checkpoint_path
        if self.main:
            save_checkpoint({"task": self.task, "config": self.config.to_dict(), "iteration": self.iteration,
                             **self.state_dict(), **fields, "train_seconds": self.train_seconds()}, path)
        return path

    def write_metrics(self, metrics: dict) -> str:
        return write_metrics(self.out_dir, metrics)

    def seconds_this_run(self) -> float:
        return time.perf_counter() - self._t0

    def train_seconds(self) -> float:
        """Training time of this run and the runs it continues."""
        return self.seconds_before + self.seconds_this_run()

    # ------------------------------------------------------------------------------ the training loop
    @contextlib.contextmanager
    def training(self, total: int, initial: int = 0, desc: str = "meta-train") -> Iterator[tqdm]:
        """The training phase: Ctrl-C deferred to step boundaries, the progress bar (closed at the
        end) and the clock of ``train_seconds``."""
        self.bar = progress_bar(total, initial=initial, desc=desc, enabled=self.progress)
        self._t0 = time.perf_counter()
        try:
            with DeferredInterrupt() as self.interrupt:
                yield self.bar
        finally:
            self.bar.close()

    def steps(self, total: int, step: Callable[[int], bool], callback: Optional[Callable[[int], None]] = None,
              where: str = "") -> None:
        """Run ``step(i)`` for i = ``self.iteration`` ... ``total - 1`` inside ``training()``.

        ``step`` returns True when a rank asked to stop (under torchrun the flag travels in the step's
        all-reduce; it reads ``self.interrupt.requested``). After each step: the progress bar, the
        periodic checkpoint (the final one is the job's), then ``callback(iteration)``. Ctrl-C at a step
        boundary saves a checkpoint; inside a step (a second Ctrl-C) it keeps the last one. Either way
        :class:`TrainingInterrupted` is raised. ``where`` prefixes the iteration in its message.
        """
        every = self.config.checkpoint_every
        mid_step = False
        try:
            while self.iteration < total:
                if self.interrupt.requested and self.world == 1:  # several ranks decide together, in step
                    raise KeyboardInterrupt
                mid_step = True
                try:
                    stop = step(self.iteration)
                except FloatingPointError as e:  # name the step; the last checkpoint stays as it is
                    raise FloatingPointError(f"{where}iteration {self.iteration + 1}/{total}: {e} (the last "
                                             f"checkpoint, if any, is kept in {self.out_dir})") from None
                self.iteration += 1
                mid_step = False
                self.bar.update(1)
                if every and self.iteration % every == 0 and self.iteration < total:
                    self.save()
                if callback is not None:
                    callback(self.iteration)
                if stop:
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            if mid_step:  # the state may be half updated
                raise TrainingInterrupted(f"interrupted inside {where}iteration {self.iteration + 1}; not saving a "
                                          f"possibly inconsistent state (the last checkpoint, if any, is in "
                                          f"{self.out_dir})", self.out_dir, None, self.iteration) from None
            path = self.save()
            raise TrainingInterrupted(f"interrupted at {where}iteration {self.iteration}/{total}; checkpoint saved "
                                      f"to {path}", self.out_dir, path, self.iteration) from None
