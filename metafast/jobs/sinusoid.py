"""The default job: meta-train MAML on sinusoid regression with the MAML paper's setup.

MLP 1-40-40-1, K=10 support and 10 query points, 1 inner SGD step with lr 0.01, meta-batch 25,
Adam 1e-3, second order. At the end: MSE on 600 held-out tasks after 1/5/10 adaptation steps for
K=5 and K=10 with 95% confidence intervals, metrics.json, a checkpoint and a PNG of adapted fits.

Resuming from a checkpoint continues the run exactly: the model, the optimizer, the iteration and
every random state (global torch CPU/CUDA and the task generator) are restored, so the final
parameters and metrics equal those of an uninterrupted run bit for bit on the same device.

Under torchrun (``torchrun --nproc_per_node W -m metafast train ...``) the job is data parallel:
``meta_batch`` is per rank (W ranks meta-train on W * meta_batch tasks per step), rank 0's initial
parameters are broadcast, each rank draws its own tasks and the meta-gradients are averaged
(metafast.distributed), so every rank takes the same Adam step. Rank 0 alone prints, writes checkpoints
and metrics and evaluates (on the same 600 held-out tasks as a single process). A rank's tasks at
iteration i are drawn from a generator seeded by hash(seed, rank, i), so a resume with the same world
size continues bit for bit like a single process does (Ctrl-C on any rank stops all ranks after the
same step, and rank 0 saves); resuming with another world size (1 included)
continues the model, optimizer and iteration exactly, but the global meta-batch becomes
W' * meta_batch and the task stream is the one of the new world size.
"""
import dataclasses
import math
import os
import time
from typing import Callable, Dict, Optional, Tuple

import torch

from .. import distributed
from ..data.sinusoid import SinusoidBatch, SinusoidTasks
from ..runtime.config import JobConfig
from ..runtime.job import Job
from ..runtime.metrics import device_label, versions
from ..runtime.progress import RunningLoss
from ..runtime.rng import rng_state, set_rng_state
from ..runtime.run import TrainingInterrupted
from .sinusoid_plot import plot_sinusoid_fits

# Under a minute on 2 idle CPU cores (measured 0.67 ms per meta-step with the fused kernel on both
# threads: 27 s of training, 32 s end to end); the paper trains for 70000 iterations (~55 s).
DEFAULT_ITERATIONS = 40000
PAPER_ITERATIONS = 70000
DEFAULT_CHECKPOINT_EVERY = 1000

# Held-out evaluation: fixed tasks, independent of the training seed, so runs compare directly.
EVAL_SEED = 20170309
EVAL_TASKS = 600
EVAL_QUERIES = 100
EVAL_SHOTS = (5, 10)
EVAL_STEPS = (1, 5, 10)
PLOT_TASKS = 4

PLOT_NAME = "sinusoid_fits.png"

# Fields that define the math of a run: a resumed run must keep them.
_FIXED_ON_RESUME = ("meta_batch", "shots", "queries", "inner_lr", "inner_steps", "meta_lr", "first_order",
                    "meta_sgd", "seed")


@dataclasses.dataclass
class SinusoidConfig(JobConfig):
    iterations: int = DEFAULT_ITERATIONS
    meta_batch: int = 25
    shots: int = 10
    queries: int = 10
    inner_lr: float = 0.01
    inner_steps: int = 1
    meta_lr: float = 1e-3
    first_order: bool = False
    meta_sgd: bool = False
    seed: int = 0
    device: str = "auto"  # cpu | cuda | auto
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY  # 0: only at the end and on Ctrl-C

    def validate(self) -> "SinusoidConfig":
        self.check_ints((("iterations", 1), ("meta_batch", 1), ("shots", 1), ("queries", 1), ("inner_steps", 1),
                         ("checkpoint_every", 0), ("seed", 0)))
        self.check_positive(("inner_lr", "meta_lr"))
        self.check_bools(("first_order", "meta_sgd"))
        self.check_device()
        return self


def build(config: SinusoidConfig, device: torch.device):
    """The MAML wrapper around MLP(1, [40, 40], 1) and its Adam optimizer."""
    import metafast
    from metafast.models import MLP

    model = MLP(1, [40, 40], 1)
    maml = metafast.BatchedMAML(model, inner_lr=config.inner_lr, inner_steps=config.inner_steps,
                                first_order=config.first_order, meta_sgd=config.meta_sgd, loss="mse").to(device)
    optimizer = torch.optim.Adam(maml.parameters(), lr=config.meta_lr)
    return maml, optimizer


def eval_tasks(device=None) -> SinusoidBatch:
    """The fixed held-out tasks: EVAL_TASKS tasks, max(EVAL_SHOTS) support and EVAL_QUERIES query points."""
    generator = torch.Generator().manual_seed(EVAL_SEED)
    return SinusoidTasks().sample(EVAL_TASKS, max(EVAL_SHOTS), EVAL_QUERIES, generator, device=device)


def evaluate(maml, batch: SinusoidBatch, shots=EVAL_SHOTS, steps=EVAL_STEPS) -> Tuple[dict, dict, dict]:
    """Mean query MSE over tasks and its 95% CI (1.96 std / sqrt(tasks)) after adapting on the first
    K support points. Returns ``mse[K][steps]``, ``ci95[K][steps]`` and ``diverged[K][steps]`` (tasks
    whose MSE is not finite: plain SGD from the meta-learned init can diverge on an unlucky support
    set, e.g. several points near x = +-5, after more steps than the model was meta-trained for; the
    mean and CI are then None) with string keys."""
    mse: Dict[str, Dict[str, Optional[float]]] = {}
    ci95: Dict[str, Dict[str, Optional[float]]] = {}
    diverged: Dict[str, Dict[str, int]] = {}
    tasks = batch.support_x.shape[0]
    for k in shots:
        sx, sy = batch.support_x[:, :k].contiguous(), batch.support_y[:, :k].contiguous()
        mse[str(k)], ci95[str(k)], diverged[str(k)] = {}, {}, {}
        for s in steps:
            fast = maml.adapt(sx, sy, steps=s)
            with torch.no_grad():
                pred = maml.predict(fast, batch.query_x)
                per_task = (pred - batch.query_y).pow(2).to(torch.float64).mean(dim=(1, 2))
            bad = int((~torch.isfinite(per_task)).sum())
            diverged[str(k)][str(s)] = bad
            mse[str(k)][str(s)] = None if bad else per_task.mean().item()
            ci95[str(k)][str(s)] = None if bad else (1.96 * per_task.std() / math.sqrt(tasks)).item()
    return mse, ci95, diverged


def format_results(mse: dict, ci95: dict, diverged: Optional[dict] = None, tasks: int = EVAL_TASKS) -> str:
    shots = list(mse)
    steps = list(mse[shots[0]])
    head = f"held-out MSE on {tasks} tasks (mean +- 95% CI)"
    cols = [f"{s} step" + ("s" if s != "1" else "") for s in steps]
    lines = [head, "       " + "".join(c.rjust(20) for c in cols)]
    notes = []
    for k in shots:
        cells = ""
        for s in steps:
            if mse[k][s] is None:
                cells += f"diverged ({diverged[k][s]}/{tasks})".rjust(20)
                notes.append(f"K={k}, {s} steps")
            else:
                cells += f"{mse[k][s]:.4f} +- {ci95[k][s]:.4f}".rjust(20)
        lines.append(f"K={k:<5}" + cells)
    if notes:
        lines.append(f"diverged: plain SGD at the inner lr reached a non-finite MSE on some tasks ({'; '.join(notes)}); "
                     "metrics.json lists them under 'diverged'")
    return "\n".join(lines)


def _plot(maml, batch: SinusoidBatch, path: str, iteration: int) -> str:
    n = min(PLOT_TASKS, batch.support_x.shape[0])
    k = max(EVAL_SHOTS)
    sx, sy = batch.support_x[:n, :k].contiguous(), batch.support_y[:n, :k].contiguous()
    grid = torch.linspace(-5.0, 5.0, 200, device=sx.device, dtype=sx.dtype)
    grid_x = grid.view(1, -1, 1).expand(n, -1, -1).contiguous()
    true_y = SinusoidTasks.function(grid_x, batch.amplitudes[:n], batch.phases[:n])
    with torch.no_grad():
        fits = {"pre-update": maml.module(grid.view(-1, 1)).view(1, -1).expand(n, -1)}
    for s in (1, 10):
        fast = maml.adapt(sx, sy, steps=s)
        with torch.no_grad():
            fits[f"{s} step" + ("s" if s > 1 else "")] = maml.predict(fast, grid_x).view(n, -1)
    return plot_sinusoid_fits(path, grid, true_y.view(n, -1), fits, sx.view(n, -1), sy.view(n, -1),
                              title=f"MAML sinusoid, {iteration} meta-iterations, K={k}",
                              amplitudes=batch.amplitudes[:n], phases=batch.phases[:n])


def train_sinusoid(config: SinusoidConfig, out_dir: str, resume: bool = False, progress: bool = True,
                   callback: Optional[Callable[[int], None]] = None, log: Callable[[str], None] = print,
                   plot: bool = True) -> Optional[dict]:
    """Run (or with ``resume`` continue) the job in ``out_dir``; returns the metrics dict (None on
    ranks other than 0 of a distributed run).

    ``callback(iteration)`` runs after every completed meta-step. Ctrl-C stops at the next step
    boundary, saves a checkpoint and raises TrainingInterrupted. Launched by torchrun with
    WORLD_SIZE > 1, it joins the process group (and leaves it at the end, also on errors) unless the
    caller already did.
    """
    return SinusoidJob(config, out_dir, resume, progress, log, callback=callback, plot=plot).run()


class SinusoidJob(Job):
    task = "sinusoid"
    config_type = SinusoidConfig
    fixed_on_resume = _FIXED_ON_RESUME

    def state_dict(self) -> dict:
        return {"maml": self.maml.state_dict(), "model": self.maml.module.state_dict(),
                "optimizer": self.optimizer.state_dict(), "rng": rng_state(self.device, {"tasks": self.generator}),
                "running_loss": self.running.state(), "world_size": self.world}

    def execute(self, device: torch.device) -> Optional[dict]:
        config, world, log = self.config, self.world, self.log
        state = self.open()

        torch.manual_seed(config.seed)  # model initialisation (and any randomness inside the step)
        self.maml, self.optimizer = build(config, device)
        self.generator = torch.Generator().manual_seed(config.seed)  # task sampling, on the CPU: device independent
        self.tasks = SinusoidTasks()
        self.running = RunningLoss()
        start = self.iteration
        if state is not None:
            self.maml.load_state_dict(state["maml"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.running = RunningLoss.from_state(state["running_loss"], device=device)
            set_rng_state(state["rng"], device, {"tasks": self.generator})
            saved_world = state.get("world_size", 1)
            if world == 1 and saved_world > 1:  # that stream was per iteration: start a fresh one
                self.generator.manual_seed(distributed.task_seed(config.seed, 0, start))
            log(f"resuming {self.out_dir} at iteration {start}/{config.iterations}"
                + (f" (checkpoint of {saved_world} processes)" if saved_world != world else ""))
        distributed.broadcast_parameters(self.maml)  # rank 0's parameters: every rank starts identical
        if world > 1:
            log(f"distributed: {world} processes ({torch.distributed.get_backend()}), meta-batch {config.meta_batch} "
                f"per process = {world * config.meta_batch} tasks per step")

        with self.training(config.iterations, initial=start):
            self.steps(config.iterations, self.step, self.callback)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_seconds = self.seconds_this_run()
        self.save()  # before evaluation, so an interrupted evaluation resumes without retraining
        if not self.main:  # evaluation, metrics and plot are rank 0's
            return None
        return self.finish(start, train_seconds)

    def step(self, iteration: int) -> bool:
        config, maml = self.config, self.maml
        if self.world > 1:  # each rank its own tasks, recomputable from (seed, rank, iteration)
            self.generator.manual_seed(distributed.task_seed(config.seed, distributed.rank(), iteration))
        batch = self.tasks.sample(config.meta_batch, config.shots, config.queries, self.generator, device=self.device)
        out = maml(batch.support_x, batch.support_y, batch.query_x, batch.query_y)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        loss = out.loss.detach()
        stop = None
        if self.world > 1:  # mean meta-gradient (and loss) over all ranks' tasks
            # Ctrl-C on any rank travels in the same all_reduce, so all stop after the same step
            loss = loss.clone()
            stop = torch.full((1,), float(self.interrupt.requested), dtype=loss.dtype, device=loss.device)
            distributed.all_reduce_gradients(maml.parameters(), also=[loss, stop])
        self.optimizer.step()
        self.running.update(loss)
        if (iteration + 1) % 50 == 0 or iteration + 1 == config.iterations:
            self.bar.set_postfix(loss=f"{self.running.value():.4f}", refresh=False)
        return stop is not None and stop.item() > 0

    def finish(self, start: int, train_seconds: float) -> dict:
        config, iteration = self.config, self.iteration
        t1 = time.perf_counter()
        try:
            batch = eval_tasks(self.device)
            mse, ci95, diverged = evaluate(self.maml, batch)
        except KeyboardInterrupt:
            msg = f"interrupted during evaluation; training is complete and saved to {self.checkpoint_path}"
            raise TrainingInterrupted(msg, self.out_dir, self.checkpoint_path, iteration) from None
        eval_seconds = time.perf_counter() - t1
        self.log(format_results(mse, ci95, diverged))
        done = iteration - start
        metrics = {
            "task": "sinusoid",
            "mse": mse,
            "ci95": ci95,
            "diverged": diverged,
            "eval": {"tasks": EVAL_TASKS, "queries": EVAL_QUERIES, "seed": EVAL_SEED, "shots": list(EVAL_SHOTS),
                     "steps": list(EVAL_STEPS), "inner_lr": config.inner_lr},
            "iteration": iteration,
            "train_loss": self.running.value(),
            "config": config.to_dict(),
            "device": device_label(self.device),
            "world_size": self.world,
            "tasks_per_iteration": self.world * config.meta_batch,
            "timing": {
                "iterations_this_run": done,
                "train_seconds_this_run": train_seconds,
                "ms_per_iteration": 1e3 * train_seconds / done if done else None,
                "train_seconds_total": self.seconds_before + train_seconds,
                "eval_seconds": eval_seconds,
            },
            "versions": versions(),
        }
        written = [self.write_metrics(metrics), self.checkpoint_path]
        if self.plot:
            written.append(_plot(self.maml, batch, os.path.join(self.out_dir, PLOT_NAME), iteration))
        self.log("wrote " + ", ".join(written))
        return metrics
