"""The default multi-task job: several related synthetic classification tasks that share structure,
trained once per loss weighting strategy (equal / uncertainty / gradnorm) from the same initialisation.

Data: x ~ N(0, I_D); a shared latent z = tanh(2 P x) with P [latent, D]; task t labels
y_t = argmax_c (B_t z)_c with its own B_t [classes, latent]. The training labels of task t are replaced
by a uniformly random class with probability noise_t (noise rising linearly from 0 to ``max_noise``
over the tasks), so the tasks are related but differ in how trustworthy their labels are. Test labels
are the noiseless rule: the accuracy measures what each task actually learnt.

Model: MLP trunk D -> hidden -> hidden (ReLU) shared by all tasks, one nn.Linear(hidden, classes) head
per task, stacked (the fused heads + cross-entropy op). Adam; the uncertainty and GradNorm weights
have their own learning rate.

Checkpoints are written atomically every ``checkpoint_every`` iterations, at the end of each strategy
and on Ctrl-C; resuming restores the model, optimizer, strategy, iteration, finished strategies'
results and all random states, so a resumed run ends with the same numbers as an uninterrupted one.

Under torchrun (``torchrun --nproc_per_node W -m metafast multitask ...``) the job is data parallel:
``batch_size`` is the global batch; every rank draws the same row indices and trains on its own shard
of them (MultiTaskTrainer.step), gradients and GradNorm's statistics are averaged, so every rank takes
the step one process takes on the whole batch and keeps the same weighting state. Rank 0 alone
prints and writes checkpoints and metrics (the output directory must be visible to every rank);
Ctrl-C on any rank stops all ranks after the same step. The batch stream does not depend on the
world size, so a run resumes with any number of processes.
"""
import dataclasses
import math
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from .. import distributed
from ..multitask.model import MultiTask
from ..multitask.trainer import MultiTaskTrainer, per_task_accuracy
from ..multitask.weighting import STRATEGIES, make_weighting
from ..runtime.config import JobConfig
from ..runtime.job import Job
from ..runtime.metrics import device_label, versions
from ..runtime.progress import RunningLoss
from ..runtime.rng import rng_state, set_rng_state
from ..runtime.run import TrainingInterrupted  # noqa: F401  (what run_multitask raises on Ctrl-C)

# Fields that define the math of a run: a resumed run must keep them.
_FIXED_ON_RESUME = ("tasks", "classes", "in_dim", "latent", "hidden", "train_size", "test_size", "max_noise",
                    "batch_size", "lr", "weighting_lr", "alpha", "strategies", "seed")


@dataclasses.dataclass
class MultiTaskConfig(JobConfig):
    iterations: int = 3000  # per strategy: 16-28 s for all three on 2 CPU cores (1 thread); 6000 gains nothing
    strategies: tuple = STRATEGIES
    tasks: int = 6
    classes: int = 5
    in_dim: int = 20
    latent: int = 8
    hidden: int = 64
    train_size: int = 20000
    test_size: int = 4000
    max_noise: float = 0.6
    batch_size: int = 128
    lr: float = 3e-3
    weighting_lr: float = 0.025
    alpha: float = 1.5
    seed: int = 0
    device: str = "auto"
    checkpoint_every: int = 500  # 0: only after each strategy and on Ctrl-C

    def validate(self) -> "MultiTaskConfig":
        self.check_ints((("iterations", 1), ("tasks", 1), ("classes", 2), ("in_dim", 1), ("latent", 1),
                         ("hidden", 1), ("train_size", 1), ("test_size", 1), ("batch_size", 1), ("seed", 0),
                         ("checkpoint_every", 0)))
        self.check_positive(("lr", "weighting_lr"))
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha >= 0):
            raise ValueError(f"alpha must be a finite number >= 0, got {self.alpha!r}")
        if not (isinstance(self.max_noise, (int, float)) and 0 <= self.max_noise < 1):
            raise ValueError(f"max_noise must be in [0, 1), got {self.max_noise!r}")
        self.strategies = tuple(self.strategies)
        bad = [s for s in self.strategies if s not in STRATEGIES]
        if not self.strategies or bad or len(set(self.strategies)) != len(self.strategies):
            raise ValueError(f"strategies must be distinct names from {STRATEGIES}, got {list(self.strategies)}")
        self.check_device()
        return self

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["strategies"] = list(self.strategies)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "MultiTaskConfig":
        d = dict(d)
        if "strategies" in d:
            d["strategies"] = tuple(d["strategies"])
        return super().from_dict(d)


def task_noise(config: MultiTaskConfig) -> List[float]:
    if config.tasks == 1:
        return [0.0]
    return [config.max_noise * t / (config.tasks - 1) for t in range(config.tasks)]


def make_data(config: MultiTaskConfig, device: torch.device) -> Dict[str, torch.Tensor]:
    """Shared inputs and per-task labels: x_train [n, D], y_train [T, n] (noisy), x_test, y_test (clean)."""
    g = torch.Generator().manual_seed(config.seed + 7919)
    T, C, D, L = config.tasks, config.classes, config.in_dim, config.latent
    P = torch.randn(L, D, generator=g) / math.sqrt(D)
    B = torch.randn(T, C, L, generator=g)

    def labels(x):
        z = torch.tanh(2.0 * x @ P.t())
        return torch.einsum("nl,tcl->tnc", z, B).argmax(-1)

    x_train = torch.randn(config.train_size, D, generator=g)
    x_test = torch.randn(config.test_size, D, generator=g)
    y_train = labels(x_train)
    flip = torch.rand(T, config.train_size, generator=g) < torch.tensor(task_noise(config)).unsqueeze(1)
    y_train = torch.where(flip, torch.randint(0, C, y_train.shape, generator=g), y_train)
    return {"x_train": x_train.to(device), "y_train": y_train.to(device),
            "x_test": x_test.to(device), "y_test": labels(x_test).to(device)}


def build_model(config: MultiTaskConfig, device: torch.device) -> MultiTask:
    torch.manual_seed(config.seed)  # every strategy starts from the same initialisation
    trunk = nn.Sequential(nn.Linear(config.in_dim, config.hidden), nn.ReLU(),
                          nn.Linear(config.hidden, config.hidden), nn.ReLU())
    heads = [nn.Linear(config.hidden, config.classes) for _ in range(config.tasks)]
    return MultiTask(trunk, heads).to(device)


def format_results(results: Dict[str, dict]) -> str:
    names = list(results)
    tasks = len(next(iter(results.values()))["accuracy"])
    lines = ["test accuracy per task (noiseless labels)",
             "strategy     " + "".join(f"task {t}".rjust(9) for t in range(tasks)) + "     mean"]
    for name in names:
        acc = results[name]["accuracy"]
        lines.append(f"{name:<13}" + "".join(f"{a:9.3f}" for a in acc) + f"{results[name]['mean_accuracy']:9.3f}")
    return "\n".join(lines)


def run_multitask(config: MultiTaskConfig, out_dir: str, resume: bool = False, progress: bool = True,
                  log: Callable[[str], None] = print,
                  callback: Optional[Callable[[str, int], None]] = None) -> Optional[dict]:
    """Run (or with ``resume`` continue) the job in ``out_dir``; returns the metrics dict (None on ranks
    other than 0 of a distributed run). ``callback(strategy, iteration)`` runs after every completed
    step. Launched by torchrun with WORLD_SIZE > 1, it joins the process group (and leaves it at the
    end, also on errors) unless the caller already did."""
    return MultiTaskJob(config, out_dir, resume, progress, log, callback=callback).run()


class MultiTaskJob(Job):
    """One training loop per strategy, each from the same initialisation; the checkpoint holds the
    finished strategies' results and the state of the one in progress."""
    task = "multitask"
    config_type = MultiTaskConfig
    fixed_on_resume = _FIXED_ON_RESUME

    def state_dict(self) -> dict:
        return {"strategy_index": self.index, "model": self.model.state_dict(),
                "weighting": self.weighting.state_dict(), "optimizer": self.optimizer.state_dict(),
                "rng": rng_state(torch.device("cpu"), {"batches": self.generator}),
                "running_loss": self.running.state(), "results": self.results}

    def execute(self, device: torch.device) -> Optional[dict]:
        config, world = self.config, self.world
        if world > 1 and config.batch_size < world:
            raise ValueError(f"batch_size {config.batch_size} cannot be split across {world} processes")
        state = self.open()
        if world > 1:
            self.log(f"distributed: {world} processes ({torch.distributed.get_backend()}), batch {config.batch_size} "
                     f"split across them")
        self.data = make_data(config, device)
        n_strat, total_steps = len(config.strategies), config.iterations * len(config.strategies)
        self.results: Dict[str, dict] = dict(state["results"]) if state else {}
        self.index = state["strategy_index"] if state else 0
        with self.training(total_steps, desc="multitask") as bar:
            while self.index < n_strat:
                self.train_strategy(config.strategies[self.index], state, bar)
                state = None
                self.index += 1
        train_seconds = self.train_seconds()
        if not self.main:  # metrics are rank 0's
            return None
        self.log(format_results(self.results))
        metrics = {
            "task": "multitask",
            "results": {name: self.results[name] for name in config.strategies},
            "task_label_noise": task_noise(config),
            "config": config.to_dict(),
            "device": device_label(device),
            "world_size": world,
            "timing": {"train_seconds_total": train_seconds,
                       "ms_per_iteration": 1e3 * train_seconds / total_steps},
            "versions": versions(),
        }
        self.log("wrote " + ", ".join([self.write_metrics(metrics), self.checkpoint_path]))
        return metrics

    def train_strategy(self, name: str, state: Optional[dict], bar) -> None:
        config, device = self.config, self.device
        self.model = build_model(config, device)
        self.weighting = make_weighting(name, config.tasks, alpha=config.alpha).to(device)
        groups = MultiTaskTrainer.parameter_groups(self.model, self.weighting, config.lr, config.weighting_lr)
        self.optimizer = torch.optim.Adam(groups)
        self.trainer = MultiTaskTrainer(self.model, self.weighting, self.optimizer)
        self.generator = torch.Generator().manual_seed(config.seed * 1000 + self.index)
        self.running = RunningLoss()
        self.iteration = 0
        if state is not None and state["strategy_index"] == self.index and state.get("model") is not None:
            self.model.load_state_dict(state["model"])
            self.weighting.load_state_dict(state["weighting"])
            self.optimizer.load_state_dict(state["optimizer"])
            set_rng_state(state["rng"], torch.device("cpu"), {"batches": self.generator})
            self.running = RunningLoss.from_state(state["running_loss"], device=device)
            self.iteration = state["iteration"]
            self.log(f"resuming {self.out_dir}: strategy {name!r} at iteration {self.iteration}/{config.iterations}")
        distributed.broadcast_parameters(self.model)  # rank 0's state: every rank starts identical
        distributed.broadcast_parameters(self.weighting)
        bar.n = self.index * config.iterations + self.iteration
        bar.set_description(f"multitask[{name}]")
        bar.refresh()
        callback = None if self.callback is None else (lambda i: self.callback(name, i))
        self.steps(config.iterations, self.step, callback, where=f"{name!r} ")
        acc = per_task_accuracy(self.model, self.data["x_test"], self.data["y_test"])
        self.results[name] = {"accuracy": acc, "mean_accuracy": sum(acc) / len(acc),
                              "final_weights": [float(w) for w in self.weighting.weights()],
                              "train_loss": self.running.value()}
        # the strategy is done: the checkpoint moves on to the next one
        self.save(strategy_index=self.index + 1, iteration=0, model=None, weighting=None, optimizer=None)

    def step(self, iteration: int) -> bool:
        config, data = self.config, self.data
        idx = torch.randint(0, config.train_size, (config.batch_size,), generator=self.generator).to(self.device)
        stop = None
        if self.world > 1:  # Ctrl-C on any rank travels in the step's all_reduce
            stop = torch.full((1,), float(self.interrupt.requested), device=self.device)
        out = self.trainer.step(data["x_train"][idx], data["y_train"][:, idx], also=() if stop is None else (stop,))
        self.running.update(out["loss"])
        if (iteration + 1) % 50 == 0:
            self.bar.set_postfix(loss=f"{self.running.value():.4f}", refresh=False)
        return stop is not None and stop.item() > 0
