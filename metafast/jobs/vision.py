"""Few-shot image classification: `metafast train --dataset omniglot|miniimagenet|cifarfs|fc100|folder
[--algorithm maml|fomaml|metasgd|anil|mamlpp|protonet]` and `metafast eval CHECKPOINT`.

Presets (PRESETS) follow the MAML paper for Omniglot and miniImageNet and learn2learn's MAML example
for CIFAR-FS / FC100; every field can be overridden on the command line. Training samples meta-batches
of episodes from the 'train' split, validates every ``val_every`` iterations on a fixed set of
'val' episodes, keeps the best validated weights in best.pt and the latest state in checkpoint.pt
(atomic; ``--resume`` continues bit for bit: model, optimizer, episode generator, RNGs, history).
At the end the best weights are evaluated on the 600 fixed 'test' episodes: mean accuracy +- 95% CI
(1.96 std / sqrt(episodes)) goes to metrics.json, the curves to curves.json and training_curves.png.
The meta-learners (how each is built, trained and evaluated) are in vision_algorithms.py.
"""
import dataclasses
import os
import time
from typing import Callable, Dict, List, Optional

import torch

from ..algorithms.batched_maml import MEMORY_MODES
from ..runtime.checkpoint import CHECKPOINT_NAME, atomic_write, load_checkpoint, save_checkpoint, write_json
from ..runtime.config import JobConfig
from ..runtime.job import Job
from ..runtime.metrics import METRICS_NAME, device_label, versions
from ..runtime.progress import RunningLoss
from ..runtime.rng import rng_state, set_rng_state
from ..runtime.run import TrainingInterrupted, resolve_device  # noqa: F401  (what train_vision raises on Ctrl-C)
from .vision_algorithms import (ALGORITHMS, EVAL_BATCH, INNER_OPTIONS, MAMLPP_SCHEDULE, algorithm_from_flags,  # noqa: F401
                                build_learner, check_algorithm, check_episodes, evaluate, train_step)

DATASETS = ("omniglot", "miniimagenet", "cifarfs", "fc100", "folder")  # folder: your own ImageFolder (--root)
MODELS = ("conv4", "resnet12")
BEST_NAME = "best.pt"
CURVES_NAME = "curves.json"
PLOT_NAME = "training_curves.png"

# dataset -> (channels, image side)
IMAGE = {"omniglot": (1, 28), "miniimagenet": (3, 84), "cifarfs": (3, 32), "fc100": (3, 32)}

PRESETS: Dict[str, dict] = {
    # MAML paper (Finn et al. 2017), Omniglot 5-way: Conv4 64 ch stride 2, 1 step lr 0.4 (3 at test),
    # meta-batch 32, Adam 1e-3, 60000 iterations; query set = K per class.
    "omniglot": dict(model="conv4", width=64, inner_lr=0.4, inner_steps=1, test_inner_steps=3, meta_batch=32,
                     meta_lr=1e-3, queries=None, eval_queries=15, iterations=60000),
    # MAML paper, miniImageNet: Conv4 32 ch max-pool, 5 steps lr 0.01 (10 at test), 15 queries per
    # class, meta-batch 4, Adam 1e-3, 60000 iterations.
    "miniimagenet": dict(model="conv4", width=32, inner_lr=0.01, inner_steps=5, test_inner_steps=10, meta_batch=4,
                         meta_lr=1e-3, queries=15, eval_queries=15, iterations=60000),
    # learn2learn's MAML example (examples/vision/maml_miniimagenet.py) with its CIFAR-FS/FC100 CNN4
    # (64 ch, max-pool): 1 step lr 0.5, meta-batch 32, Adam 0.003, queries = shots, 60000 iterations.
    "cifarfs": dict(model="conv4", width=64, inner_lr=0.5, inner_steps=1, test_inner_steps=1, meta_batch=32,
                    meta_lr=3e-3, queries=None, eval_queries=15, iterations=60000),
    "fc100": dict(model="conv4", width=64, inner_lr=0.5, inner_steps=1, test_inner_steps=1, meta_batch=32,
                  meta_lr=3e-3, queries=None, eval_queries=15, iterations=60000),
    # a user's folder of classes (metafast.data.folder): the CIFAR-FS recipe at miniImageNet's 84x84 RGB
    "folder": dict(model="conv4", width=64, inner_lr=0.5, inner_steps=1, test_inner_steps=1, meta_batch=32,
                   meta_lr=3e-3, queries=None, eval_queries=15, iterations=60000, image_size=84, channels=3),
}
NORMALIZE = ("none", "dataset", "imagenet")  # folder: pixels in [0, 1] / per-channel train-split stats / ImageNet's
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
# MAML paper, Omniglot 20-way: 5 steps lr 0.1 in training and at test, meta-batch 16.
OMNIGLOT_20WAY = dict(inner_lr=0.1, inner_steps=5, test_inner_steps=5, meta_batch=16)
_FIXED_ON_RESUME = ("algorithm", "dataset", "ways", "shots", "queries", "model", "width", "inner_lr", "inner_steps", "meta_batch",
                    "meta_lr", "first_order", "meta_sgd", "seed", "train_split", "train_ways", "train_shots", "distance")


@dataclasses.dataclass
class VisionConfig(JobConfig):
    dataset: str = "omniglot"
    root: str = "data"
    ways: int = 5
    shots: int = 1
    queries: Optional[int] = None        # None: the preset's (None there: = shots)
    eval_queries: Optional[int] = None
    model: Optional[str] = None
    width: Optional[int] = None          # conv channels of Conv4 (ResNet-12 keeps its widths)
    inner_lr: Optional[float] = None
    inner_steps: Optional[int] = None
    test_inner_steps: Optional[int] = None
    meta_batch: Optional[int] = None
    meta_lr: Optional[float] = None
    first_order: bool = False
    meta_sgd: bool = False
    memory: str = "fast"                 # BatchedMAML's memory mode: "fast", "low" or "min" (same results)
    task_chunk: Optional[int] = None     # tasks per chunk of the meta-batch (same results)
    iterations: Optional[int] = None
    val_every: int = 500                 # 0: no validation (best.pt = the final weights)
    val_episodes: int = 100
    eval_episodes: int = 600
    checkpoint_every: int = 1000
    train_split: str = "train"           # omniglot also accepts 'trainval' (the 1200 characters)
    seed: int = 0
    device: str = "auto"
    download: bool = False
    # --dataset folder only: image side and channels, normalisation, the seed splitting the classes
    image_size: Optional[int] = None
    channels: Optional[int] = None
    normalize: str = "none"
    split_seed: int = 0
    mean: Optional[List[float]] = None   # per-channel, filled from `normalize` (saved with the run)
    std: Optional[List[float]] = None
    algorithm: Optional[str] = None      # one of ALGORITHMS; None: maml, or the variant first_order / meta_sgd name
    train_ways: Optional[int] = None     # protonet: ways / shots of the training episodes (None: = ways / shots)
    train_shots: Optional[int] = None
    distance: Optional[str] = None       # protonet: "euclidean" (its default) or "cosine"

    def resolved(self) -> "VisionConfig":
        """A copy with every None filled: the algorithm (from first_order / meta_sgd when not named), then
        the dataset's preset (protonet: all but the inner loop's options, and its training episodes)."""
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset: expected one of {', '.join(DATASETS)}, got {self.dataset!r}")
        preset = dict(PRESETS[self.dataset])
        if self.dataset == "omniglot" and self.ways == 20:
            preset.update(OMNIGLOT_20WAY)
        out = dataclasses.replace(self)
        if out.algorithm is None:
            out.algorithm = algorithm_from_flags(out.first_order, out.meta_sgd)
        out.first_order = out.first_order or out.algorithm == "fomaml"
        out.meta_sgd = out.meta_sgd or out.algorithm == "metasgd"
        if out.algorithm == "protonet":  # no inner loop: its options stay unset (check_algorithm refuses them)
            preset = {k: v for k, v in preset.items() if k not in INNER_OPTIONS}
            out.train_ways = out.ways if out.train_ways is None else out.train_ways
            out.train_shots = out.shots if out.train_shots is None else out.train_shots
            out.distance = out.distance or "euclidean"
        for k, v in preset.items():
            if getattr(out, k) is None:
                setattr(out, k, v)
        if out.queries is None:
            out.queries = out.shots
        if out.normalize == "imagenet" and out.mean is None:
            out.mean, out.std = list(IMAGENET_MEAN), list(IMAGENET_STD)
        return out.validate()

    @classmethod
    def from_dict(cls, d: dict) -> "VisionConfig":
        config = super().from_dict(d)
        if config.algorithm is None or (config.algorithm == "maml" and (config.first_order or config.meta_sgd)):
            # saved before the algorithm was named (or its variants were): the name the flags give it now
            config.algorithm = algorithm_from_flags(config.first_order, config.meta_sgd)
        return config

    def validate(self) -> "VisionConfig":
        self.check_ints((("ways", 2), ("shots", 1), ("queries", 1), ("eval_queries", 1), ("meta_batch", 1),
                         ("iterations", 1), ("val_every", 0), ("val_episodes", 1), ("eval_episodes", 1),
                         ("checkpoint_every", 0), ("seed", 0), ("width", 1)))
        self.check_positive(("meta_lr",))
        if self.memory not in MEMORY_MODES:
            raise ValueError(f"memory must be one of {', '.join(MEMORY_MODES)}, got {self.memory!r}")
        if self.task_chunk is not None:
            self.check_ints((("task_chunk", 1),))
        check_algorithm(self)
        if self.algorithm != "protonet":
            self.check_ints((("inner_steps", 1), ("test_inner_steps", 1)))
            self.check_positive(("inner_lr",))
        elif self.distance not in (None, "euclidean", "cosine"):
            raise ValueError(f"distance must be 'euclidean' or 'cosine', got {self.distance!r}")
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {', '.join(MODELS)}, got {self.model!r}")
        allowed = ("train", "trainval") if self.dataset == "omniglot" else ("train",)
        if self.train_split not in allowed:
            raise ValueError(f"train_split must be one of {', '.join(allowed)} for {self.dataset}, got {self.train_split!r}")
        self.check_device()
        self._check_folder_options()
        return self

    def _check_folder_options(self) -> None:
        if self.dataset != "folder":
            for name in ("image_size", "channels"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} applies to --dataset folder only ({self.dataset} has a fixed size)")
            if self.normalize != "none":
                raise ValueError(f"normalize applies to --dataset folder only, got {self.normalize!r}")
            return
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or self.image_size < 16:
            raise ValueError(f"image_size must be an integer >= 16 (Conv4 halves it 4 times), got {self.image_size!r}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {self.channels!r}")
        if self.normalize not in NORMALIZE:
            raise ValueError(f"normalize must be one of {', '.join(NORMALIZE)}, got {self.normalize!r}")
        if self.normalize == "imagenet" and self.channels != 3:
            raise ValueError("normalize 'imagenet' needs channels 3 (use 'dataset' for grayscale)")


# ----------------------------------------------------------------------------- building blocks
def load_data(dataset: str, root: str, split: str, download: bool = False, config: Optional[VisionConfig] = None):
    """The ImageSplit of ``dataset``'s ``split`` under ``root`` (``config``: the folder dataset's options)."""
    if dataset == "folder":
        from ..data.folder import FolderDataset
        if config is None:
            raise ValueError("load_data: the folder dataset needs the run's config (image size, channels)")
        ways, shots, queries = episode_shape(config, split)
        return FolderDataset(root, split=split, image_size=config.image_size, channels=config.channels,
                             split_seed=config.split_seed, min_classes=ways, min_images=shots + queries)
    if dataset == "omniglot":
        from ..data.omniglot import Omniglot
        return Omniglot(root, split=split, download=download)
    if dataset == "miniimagenet":
        from ..data.miniimagenet import MiniImageNet
        return MiniImageNet(root, split=split, download=download)
    from ..data.cifar import CIFARFS, FC100
    return (CIFARFS if dataset == "cifarfs" else FC100)(root, split=split, download=download)


def episode_shape(config: VisionConfig, split: str):
    """(ways, shots, queries) of ``split``'s episodes: the training ones (protonet: train_ways/train_shots)
    or the evaluation ones."""
    if split in ("train", "trainval"):
        return config.train_ways or config.ways, config.train_shots or config.shots, config.queries
    return config.ways, config.shots, config.eval_queries


def make_sampler(config: VisionConfig, data, split: str, device: torch.device, seed: int = 0):
    """The EpisodeSampler of ``split``, after checking that the data serves its episodes (errors name the option)."""
    from ..data.episodes import EpisodeSampler

    ways, shots, queries = episode_shape(config, split)
    train = split in ("train", "trainval")
    names = ("train_ways", "train_shots", "queries") if train and config.algorithm == "protonet" else \
        ("ways", "shots", "queries" if train else "eval_queries")
    check_episodes(data, ways, shots, queries, names)
    return EpisodeSampler(data, ways, shots, queries, device=device, seed=seed, mean=config.mean, std=config.std)


def build_model(config: VisionConfig) -> torch.nn.Module:
    from ..models.conv4 import Conv4
    from ..models.resnet12 import ResNet12

    channels, size = (config.channels, config.image_size) if config.dataset == "folder" else IMAGE[config.dataset]
    if config.model == "resnet12":
        return ResNet12(config.ways, in_channels=channels, image_size=size)
    if config.dataset == "omniglot":  # stride 2, no pooling
        return Conv4(config.ways, in_channels=1, hidden=config.width, image_size=size, stride=2, pool=False)
    return Conv4(config.ways, in_channels=channels, hidden=config.width, image_size=size, stride=1, pool=True)


def build(config: VisionConfig, device: torch.device):
    """(meta-learner of ``config.algorithm`` on the config's network, its Adam optimizer)."""
    return build_learner(config, build_model(config), device)


def plot_curves(path: str, history: dict, title: str) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    tr = history["train"]
    if tr:
        its = [r["iteration"] for r in tr]
        ax1.plot(its, [r["loss"] for r in tr], label="train query loss")
        ax2.plot(its, [r["accuracy"] for r in tr], label="train query accuracy")
    va = history["val"]
    if va:
        ax2.errorbar([r["iteration"] for r in va], [r["accuracy"] for r in va], yerr=[r["ci95"] for r in va],
                     marker="o", capsize=3, label="val accuracy (95% CI)")
    ax1.set_xlabel("meta-iteration")
    ax2.set_xlabel("meta-iteration")
    ax1.set_ylabel("loss")
    ax2.set_ylabel("accuracy")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    return path


def _title(c: VisionConfig) -> str:
    train = f", trained {c.train_ways}-way {c.train_shots}-shot" if c.algorithm == "protonet" else ""
    return f"{c.algorithm} {c.dataset} {c.ways}-way {c.shots}-shot ({c.model}{train})"


# ----------------------------------------------------------------------------- training
def train_vision(config: VisionConfig, out_dir: str, resume: bool = False, progress: bool = True,
                 callback: Optional[Callable[[int], None]] = None, log: Callable[[str], None] = print,
                 plot: bool = True) -> dict:
    """Meta-train (or with ``resume`` continue) in ``out_dir``; returns the metrics dict."""
    return VisionJob(config, out_dir, resume, progress, log, callback=callback, plot=plot).run()


class VisionJob(Job):
    task = "vision"
    config_type = VisionConfig
    fixed_on_resume = _FIXED_ON_RESUME
    user_errors = (ValueError, FileNotFoundError, ImportError)  # a missing dataset or torchvision
    data_parallel = False  # one process: `metafast train` refuses torchrun for it

    def run(self) -> dict:
        self.config = self.config.resolved()
        self.best_path = os.path.join(self.out_dir, BEST_NAME)
        return super().run()

    def state_dict(self) -> dict:
        return {"maml": self.learner.state_dict(), "optimizer": self.optimizer.state_dict(),
                "sampler": self.sampler.state_dict(), "rng": rng_state(self.device, {}),
                "running_loss": self.running.state(), "running_acc": self.running_acc.state(),
                "history": self.history, "best": self.best}

    def save_best(self, iteration: int, val: Optional[dict]) -> None:
        save_checkpoint({"task": self.task, "config": self.config.to_dict(), "iteration": iteration,
                         "maml": self.learner.state_dict(), "val": None if val is None else
                         {k: v for k, v in val.items() if k != "per_episode"}}, self.best_path)

    def execute(self, device: torch.device) -> dict:
        config = self.config
        state = self.open(create=False)  # data first: a missing dataset fails before anything is written
        train_data = load_data(config.dataset, config.root, config.train_split, config.download, config)
        self.validate = config.val_every > 0 and config.train_split == "train"
        val_data = load_data(config.dataset, config.root, "val", config.download, config) if self.validate else None
        if config.normalize == "dataset" and config.mean is None:
            from ..data.folder import channel_stats
            config.mean, config.std = channel_stats(train_data)
        # the samplers check that the data serves the episodes: a bad ways/shots fails before anything is written
        self.sampler = make_sampler(config, train_data, config.train_split, device, seed=config.seed)
        self.val_sampler = make_sampler(config, val_data, "val", device) if self.validate else None
        os.makedirs(self.out_dir, exist_ok=True)

        torch.manual_seed(config.seed)
        self.learner, self.optimizer = build(config, device)  # any algorithm's (checkpoints keep it under "maml")
        self.running, self.running_acc = RunningLoss(), RunningLoss()
        self.history = {"train": [], "val": []}
        self.best = {"accuracy": -1.0, "iteration": 0}
        start = self.iteration
        if state is not None:
            self.learner.load_state_dict(state["maml"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.sampler.load_state_dict(state["sampler"])
            self.running = RunningLoss.from_state(state["running_loss"], device=device)
            self.running_acc = RunningLoss.from_state(state["running_acc"], device=device)
            self.history, self.best = state["history"], state["best"]
            set_rng_state(state["rng"], device, {})
            self.log(f"resuming {self.out_dir} at iteration {start}/{config.iterations}")

        self.log_every = max(1, min(50, config.iterations // 20))
        with self.training(config.iterations, initial=start):
            self.steps(config.iterations, self.step, self.callback)
        train_seconds = self.seconds_this_run()
        if not self.validate:
            self.best = {"accuracy": None, "iteration": self.iteration}
            self.save_best(self.iteration, None)
        self.save()
        curves = os.path.join(self.out_dir, CURVES_NAME)
        write_json(curves, self.history)
        written = [self.checkpoint_path, self.best_path, curves]
        if self.plot:
            written.append(plot_curves(os.path.join(self.out_dir, PLOT_NAME), self.history, _title(config)))
        done = self.iteration - start
        metrics = evaluate_checkpoint(self.best_path, root=config.root, device=config.device, log=self.log,
                                      out=os.path.join(self.out_dir, METRICS_NAME),
                                      extra={"best_val": self.best, "train_loss": self.running.value(),
                                             "timing": {"iterations_this_run": done,
                                                        "train_seconds_this_run": train_seconds,
                                                        "ms_per_iteration": 1e3 * train_seconds / max(1, done),
                                                        "train_seconds_total": self.seconds_before + train_seconds}})
        written.append(os.path.join(self.out_dir, METRICS_NAME))
        self.log("wrote " + ", ".join(written))
        return metrics

    def step(self, iteration: int) -> bool:
        config = self.config
        batch = self.sampler.sample(config.meta_batch)
        loss, accuracy = train_step(config, self.learner, self.optimizer, batch, iteration)
        self.running.update(loss)
        self.running_acc.update(accuracy)
        done = iteration + 1
        if done % self.log_every == 0 or done == config.iterations:
            self.history["train"].append({"iteration": done, "loss": self.running.value(),
                                          "accuracy": self.running_acc.value()})
            self.bar.set_postfix(loss=f"{self.running.value():.3f}", acc=f"{self.running_acc.value():.3f}",
                                 refresh=False)
        if self.validate and (done % config.val_every == 0 or done == config.iterations):
            val = evaluate(self.learner, self.val_sampler, config.val_episodes, config.test_inner_steps)
            self.history["val"].append({"iteration": done, "accuracy": val["accuracy"], "ci95": val["ci95"]})
            if val["accuracy"] > self.best["accuracy"]:
                self.best = {"accuracy": val["accuracy"], "ci95": val["ci95"], "iteration": done}
                self.save_best(done, val)
        return False


# ----------------------------------------------------------------------------- evaluation
def evaluate_checkpoint(path: str, root: Optional[str] = None, split: str = "test", episodes: Optional[int] = None,
                        steps: Optional[int] = None, device: str = "auto", out: Optional[str] = None,
                        log: Callable[[str], None] = print, extra: Optional[dict] = None,
                        download: bool = False) -> dict:
    """Mean accuracy +- 95% CI of a checkpoint (best.pt, checkpoint.pt or a run directory) on the
    fixed episodes of ``split``; writes metrics.json (``out``, default beside the checkpoint)."""
    if os.path.isdir(path):
        path = os.path.join(path, BEST_NAME if os.path.isfile(os.path.join(path, BEST_NAME)) else CHECKPOINT_NAME)
    state = load_checkpoint(path)
    if state.get("task") != "vision":
        raise ValueError(f"{path} is a checkpoint of task {state.get('task')!r}; `metafast eval` evaluates few-shot "
                         "vision checkpoints (metafast train --dataset omniglot|miniimagenet|cifarfs|fc100|folder)")
    config = VisionConfig.from_dict(state["config"])
    proto = config.algorithm == "protonet"
    if proto and steps is not None:
        raise ValueError(f"steps (--steps): protonet has no inner loop (it classifies by the class prototypes), "
                         f"got {steps}")
    dev = resolve_device(device)
    data = load_data(config.dataset, root or config.root, split, download, config)
    learner, _ = build(config, dev)
    learner.load_state_dict(state["maml"])
    n = config.eval_episodes if episodes is None else episodes
    s = None if proto else config.test_inner_steps if steps is None else steps
    sampler = make_sampler(config, data, split, dev)
    t0 = time.perf_counter()
    result = evaluate(learner, sampler, n, s)
    seconds = time.perf_counter() - t0
    how = "prototypes" if proto else f"{s} inner steps"
    log(f"{config.algorithm} {config.dataset} {split}: {config.ways}-way {config.shots}-shot accuracy "
        f"{100 * result['accuracy']:.2f}% +- {100 * result['ci95']:.2f}% (95% CI, {n} episodes, {how}, "
        f"{config.eval_queries} queries per class)")
    metrics = {"task": "vision", "algorithm": config.algorithm, "dataset": config.dataset, "split": split,
               "ways": config.ways, "shots": config.shots, "accuracy": result["accuracy"], "ci95": result["ci95"],
               "episodes": n, "inner_steps": s, "queries_per_class": config.eval_queries,
               "checkpoint": os.path.abspath(path),
               "checkpoint_iteration": state["iteration"], "config": config.to_dict(),
               "device": device_label(dev), "eval_seconds": seconds, "versions": versions()}
    if extra:
        metrics.update(extra)
    metrics["per_episode_accuracy"] = result["per_episode"]
    write_json(out or os.path.join(os.path.dirname(os.path.abspath(path)), METRICS_NAME), metrics)
    return metrics
