"""The job skeleton (metafast.runtime.Job) on a toy job: start/resume checks, checkpoint cadence,
Ctrl-C at and inside a step, exact resume of the RNG state, and the command flow around it."""
import argparse
import dataclasses
import json
import os

import pytest
import torch

from metafast.runtime import Job, JobConfig, TrainingInterrupted, load_checkpoint
from metafast.runtime.command import CommandError, job_config, run_job
from metafast.runtime.rng import rng_state, set_rng_state


@dataclasses.dataclass
class CountConfig(JobConfig):
    iterations: int = 10
    seed: int = 0
    checkpoint_every: int = 3
    device: str = "cpu"

    def validate(self) -> "CountConfig":
        self.check_ints((("iterations", 1), ("seed", 0), ("checkpoint_every", 0)))
        self.check_device()
        return self


class CountJob(Job):
    """Sums one random number per step, drawn from its own generator and the global torch RNG."""
    task = "count"
    config_type = CountConfig
    fixed_on_resume = ("seed",)

    def __init__(self, *args, stop_at=None, stop_inside=None, **kw):
        super().__init__(*args, progress=False, log=lambda s: None, **kw)
        self.stop_at, self.stop_inside, self.saved_at = stop_at, stop_inside, []

    def state_dict(self) -> dict:
        self.saved_at.append(self.iteration)
        return {"total": self.total, "rng": rng_state(self.device, {"draws": self.generator})}

    def execute(self, device):
        state = self.open()
        torch.manual_seed(self.config.seed)
        self.generator = torch.Generator().manual_seed(self.config.seed + 1)
        self.total = torch.zeros((), dtype=torch.float64)
        if state is not None:
            self.total = state["total"]
            set_rng_state(state["rng"], device, {"draws": self.generator})
        with self.training(self.config.iterations, initial=self.iteration):
            self.steps(self.config.iterations, self.step, self.ctrl_c)
        self.save()
        self.write_metrics({"total": self.total.item(), "iteration": self.iteration})
        return {"total": self.total.item()}

    def step(self, i: int) -> bool:
        if i == self.stop_inside:
            raise KeyboardInterrupt  # a second Ctrl-C that lands inside a step
        self.total = self.total + torch.rand((), generator=self.generator, dtype=torch.float64) + torch.rand(())
        return False

    def ctrl_c(self, iteration: int) -> None:
        if iteration == self.stop_at:
            raise KeyboardInterrupt  # Ctrl-C between steps


def test_cadence_interrupt_and_exact_resume(tmp_path):
    straight = CountJob(CountConfig(), str(tmp_path / "a"))
    full = straight.run()
    assert straight.saved_at == [3, 6, 9, 10]  # every 3 iterations, the final one by the job
    assert json.loads((tmp_path / "a" / "metrics.json").read_text()) == {"total": full["total"], "iteration": 10}

    cut = CountJob(CountConfig(), str(tmp_path / "b"), stop_at=5)
    with pytest.raises(TrainingInterrupted, match="interrupted at iteration 5/10") as info:
        cut.run()
    assert info.value.checkpoint == str(tmp_path / "b" / "checkpoint.pt") and info.value.iteration == 5
    state = load_checkpoint(str(tmp_path / "b"))
    assert (state["task"], state["iteration"], state["config"]) == ("count", 5, CountConfig().to_dict())
    assert state["train_seconds"] >= 0
    resumed = CountJob(CountConfig(), str(tmp_path / "b"), resume=True).run()
    assert resumed["total"] == full["total"]  # bit for bit: both generators continue where they were


def test_interrupt_inside_a_step_keeps_the_last_checkpoint(tmp_path):
    job = CountJob(CountConfig(), str(tmp_path), stop_inside=4)
    with pytest.raises(TrainingInterrupted, match="interrupted inside iteration 5") as info:
        job.run()
    assert info.value.checkpoint is None and job.saved_at == [3]
    assert load_checkpoint(str(tmp_path))["iteration"] == 3


def test_start_and_resume_checks(tmp_path):
    CountJob(CountConfig(iterations=4), str(tmp_path)).run()
    with pytest.raises(ValueError, match="already holds a checkpoint"):
        CountJob(CountConfig(), str(tmp_path)).run()
    with pytest.raises(ValueError, match="seed: checkpoint has 0, asked for 1"):
        CountJob(CountConfig(seed=1), str(tmp_path), resume=True).run()
    with pytest.raises(ValueError, match=r"iterations must be >= 4 \(the checkpoint's iteration\), got 2"):
        CountJob(CountConfig(iterations=2), str(tmp_path), resume=True).run()
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        CountJob(CountConfig(), str(tmp_path / "missing"), resume=True).run()
    with pytest.raises(ValueError, match="checkpoint_every must be an integer >= 0, got -1"):
        CountJob(CountConfig(checkpoint_every=-1), str(tmp_path / "x")).run()
    with pytest.raises(ValueError, match=r"unknown CountConfig keys: \['width'\]"):
        CountConfig.from_dict({"iterations": 3, "width": 2})


def test_command_flow(tmp_path, capsys):
    run = str(tmp_path / "run")

    def args(**kw):
        return argparse.Namespace(**{"out": None, "resume": None, **kw})

    config, out = job_config(args(out=run), CountJob, {"iterations": 6})
    assert (config, out) == (CountConfig(iterations=6), run)
    job = CountJob(config, out, stop_at=4)
    assert run_job(job, f"count --resume {out}") == 130
    assert f"resume with: count --resume {run}" in capsys.readouterr().err
    with pytest.raises(CommandError, match="--out and --resume both given"):
        job_config(args(out=str(tmp_path / "other"), resume=run), CountJob, {})
    with pytest.raises(CommandError, match="--iterations 3: the checkpoint in .* is already at iteration 4"):
        job_config(args(resume=run), CountJob, {"iterations": 3})
    with pytest.raises(CommandError, match=r"--resume .*: cannot resume with a different setup "
                                           r"\(seed: checkpoint has 0, asked for 2\)"):
        job_config(args(resume=run), CountJob, {"seed": 2})
    config, out = job_config(args(resume=run), CountJob, {})
    assert config == CountConfig(iterations=6) and out == run
    reports = []
    assert run_job(CountJob(config, out, resume=True), "unused", reports.append) == 0
    assert reports and os.path.isfile(os.path.join(run, "metrics.json"))
    with pytest.raises(CommandError, match="already holds a checkpoint"):
        run_job(CountJob(CountConfig(), run), "unused")
