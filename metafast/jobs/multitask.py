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
import os
import platform
import time
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from .. import distributed
from ..train.checkpoint import CHECKPOINT_NAME, save_checkpoint, write_json
from ..train.interrupt import DeferredInterrupt
from ..train.run import TrainingInterrupted, check_fixed, config_from_dict, resolve_device, resume_state
from ..train.progress import RunningLoss, progress_bar
from .model import MultiTask
from .trainer import MultiTaskTrainer, per_task_accuracy
from .weighting import STRATEGIES, make_weighting

METRICS_NAME = "metrics.json"
# Fields that define the math of a run: a resumed run must keep them.
_FIXED_ON_RESUME = ("tasks", "classes", "in_dim", "latent", "hidden", "train_size", "test_size", "max_noise",
                    "batch_size", "lr", "weighting_lr", "alpha", "strategies", "seed")


@dataclasses.dataclass
class MultiTaskConfig:
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
        for name, minimum in (("iterations", 1), ("tasks", 1), ("classes", 2), ("in_dim", 1), ("latent", 1),
                              ("hidden", 1), ("train_size", 1), ("test_size", 1), ("batch_size", 1),
                              ("seed", 0), ("checkpoint_every", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
        for name in ("lr", "weighting_lr"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha >= 0):
            raise ValueError(f"alpha must be a finite number >= 0, got {self.alpha!r}")
        if not (isinstance(self.max_noise, (int, float)) and 0 <= self.max_noise < 1):
            raise ValueError(f"max_noise must be in [0, 1), got {self.max_noise!r}")
        self.strategies = tuple(self.strategies)
        bad = [s for s in self.strategies if s not in STRATEGIES]
        if not self.strategies or bad or len(set(self.strategies)) != len(self.strategies):
            raise ValueError(f"strategies must be distinct names from {STRATEGIES}, got {list(self.strategies)}")
        if self.device not in ("cpu", "cuda", "auto"):
            raise ValueError(f"device must be 'cpu', 'cuda' or 'auto', got {self.device!r}")
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
        return config_from_dict(cls, d, "multitask")


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


def check_resume_config(saved: MultiTaskConfig, wanted: MultiTaskConfig) -> None:
    """A resumed run may change iterations, device and checkpoint_every, nothing else."""
    check_fixed(saved, wanted, _FIXED_ON_RESUME)


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
                  callback: Optional[Callable[[str, int], None]] = None) -> dict:
    """Run (or with ``resume`` continue) the job in ``out_dir``; returns the metrics dict (None on ranks
    other than 0 of a distributed run). ``callback(strategy, iteration)`` runs after every completed
    step. Launched by torchrun with WORLD_SIZE > 1, it joins the process group (and leaves it at the
    end, also on errors) unless the caller already did."""
    config.validate()
    device = resolve_device(config.device)
    with distributed.session(device.type):
        return _run(config, out_dir, resume, progress, log, callback, distributed.device_for(device))


def _run(config: MultiTaskConfig, out_dir: str, resume: bool, progress: bool, log: Callable[[str], None],
         callback: Optional[Callable[[str, int], None]], device: torch.device) -> Optional[dict]:
    main, world = distributed.is_main(), distributed.world_size()
    if not main:
        progress, log = False, (lambda msg: None)
    if world > 1 and config.batch_size < world:
        raise ValueError(f"batch_size {config.batch_size} cannot be split across {world} processes")
    ckpt_path = os.path.join(out_dir, CHECKPOINT_NAME)
    state = resume_state(out_dir, resume, "multitask", config, _FIXED_ON_RESUME)
    if main:
        os.makedirs(out_dir, exist_ok=True)
    if world > 1:
        log(f"distributed: {world} processes ({torch.distributed.get_backend()}), batch {config.batch_size} "
            f"split across them")

    data = make_data(config, device)
    n_strat, total_steps = len(config.strategies), config.iterations * len(config.strategies)
    results: Dict[str, dict] = dict(state["results"]) if state else {}
    index = state["strategy_index"] if state else 0
    bar = progress_bar(total_steps, initial=0, desc="multitask", enabled=progress)
    t0 = time.perf_counter()
    seconds_before = state.get("train_seconds", 0.0) if state else 0.0
    try:
        with DeferredInterrupt() as interrupt:
            while index < n_strat:
                name = config.strategies[index]
                model = build_model(config, device)
                weighting = make_weighting(name, config.tasks, alpha=config.alpha).to(device)
                groups = MultiTaskTrainer.parameter_groups(model, weighting, config.lr, config.weighting_lr)
                optimizer = torch.optim.Adam(groups)
                trainer = MultiTaskTrainer(model, weighting, optimizer)
                generator = torch.Generator().manual_seed(config.seed * 1000 + index)
                running = RunningLoss()
                iteration = 0
                if state is not None and state["strategy_index"] == index and state.get("model") is not None:
                    model.load_state_dict(state["model"])
                    weighting.load_state_dict(state["weighting"])
                    optimizer.load_state_dict(state["optimizer"])
                    generator.set_state(state["rng"]["batches"])
                    torch.set_rng_state(state["rng"]["torch_cpu"])
                    running = RunningLoss.from_state(state["running_loss"], device=device)
                    iteration = state["iteration"]
                    log(f"resuming {out_dir}: strategy {name!r} at iteration {iteration}/{config.iterations}")
                distributed.broadcast_parameters(model)  # rank 0's state: every rank starts identical
                distributed.broadcast_parameters(weighting)
                bar.n = index * config.iterations + iteration
                bar.set_description(f"multitask[{name}]")
                bar.refresh()

                def save(done: bool = False) -> str:
                    if not main:  # every rank holds the same state; one writer
                        return ckpt_path
                    save_checkpoint({
                        "task": "multitask", "config": config.to_dict(),
                        "strategy_index": index + 1 if done else index,
                        "iteration": 0 if done else iteration,
                        "model": None if done else model.state_dict(),
                        "weighting": None if done else weighting.state_dict(),
                        "optimizer": None if done else optimizer.state_dict(),
                        "rng": {"batches": generator.get_state(), "torch_cpu": torch.get_rng_state()},
                        "running_loss": running.state(),
                        "results": results,
                        "train_seconds": seconds_before + time.perf_counter() - t0,
                    }, ckpt_path)
                    return ckpt_path

                mid_step = False
                try:
                    while iteration < config.iterations:
                        if interrupt.requested and world == 1:  # several ranks decide together, below
                            raise KeyboardInterrupt
                        mid_step = True
                        idx = torch.randint(0, config.train_size, (config.batch_size,), generator=generator)
                        idx = idx.to(device)
                        stop = None
                        if world > 1:  # Ctrl-C on any rank travels in the step's all_reduce
                            stop = torch.full((1,), float(interrupt.requested), device=device)
                        out = trainer.step(data["x_train"][idx], data["y_train"][:, idx],
                                           also=() if stop is None else (stop,))
                        running.update(out["loss"])
                        iteration += 1
                        mid_step = False
                        bar.update(1)
                        if iteration % 50 == 0:
                            bar.set_postfix(loss=f"{running.value():.4f}", refresh=False)
                        if config.checkpoint_every and iteration % config.checkpoint_every == 0 \
                                and iteration < config.iterations:
                            save()
                        if callback is not None:
                            callback(name, iteration)
                        if stop is not None and stop.item() > 0:
                            raise KeyboardInterrupt
                except KeyboardInterrupt:
                    if mid_step:
                        raise TrainingInterrupted(f"interrupted inside a step of {name!r}; not saving a possibly "
                                                  f"inconsistent state (the last checkpoint, if any, is in {out_dir})",
                                                  out_dir, None) from None
                    path = save()
                    raise TrainingInterrupted(f"interrupted at {name!r} iteration {iteration}/{config.iterations}; "
                                              f"checkpoint saved to {path}", out_dir, path) from None
                acc = per_task_accuracy(model, data["x_test"], data["y_test"])
                results[name] = {"accuracy": acc, "mean_accuracy": sum(acc) / len(acc),
                                 "final_weights": [float(w) for w in weighting.weights()],
                                 "train_loss": running.value()}
                save(done=True)
                state = None
                index += 1
    finally:
        bar.close()
    train_seconds = seconds_before + time.perf_counter() - t0
    if not main:  # metrics are rank 0's
        return None
    log(format_results(results))
    metrics = {
        "task": "multitask",
        "results": {name: results[name] for name in config.strategies},
        "task_label_noise": task_noise(config),
        "config": config.to_dict(),
        "device": f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)",
        "world_size": world,
        "timing": {"train_seconds_total": train_seconds,
                   "ms_per_iteration": 1e3 * train_seconds / total_steps},
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
    }
    write_json(os.path.join(out_dir, METRICS_NAME), metrics)
    log("wrote " + ", ".join([os.path.join(out_dir, METRICS_NAME), ckpt_path]))
    return metrics
