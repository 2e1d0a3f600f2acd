"""Few-shot image classification with MAML: `metafast train --dataset omniglot|miniimagenet|cifarfs|fc100|folder`
and `metafast eval CHECKPOINT`.

Presets (PRESETS) follow the MAML paper for Omniglot and miniImageNet and learn2learn's MAML example
for CIFAR-FS / FC100; every field can be overridden on the command line. Training samples meta-batches
of episodes from the 'train' split, validates every ``val_every`` iterations on a fixed set of
'val' episodes, keeps the best validated weights in best.pt and the latest state in checkpoint.pt
(atomic; ``--resume`` continues bit for bit: model, optimizer, episode generator, RNGs, history).
At the end the best weights are evaluated on the 600 fixed 'test' episodes: mean accuracy +- 95% CI
(1.96 std / sqrt(episodes)) goes to metrics.json, the curves to curves.json and training_curves.png.
"""
import argparse
import dataclasses
import math
import os
import platform
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

from .checkpoint import atomic_write, load_checkpoint, save_checkpoint, write_json
from .interrupt import DeferredInterrupt
from .run import TrainingInterrupted, config_from_dict, new_run_dir, resolve_device, resume_state
from .progress import RunningLoss, progress_bar
from .arguments import int_at_least as _int_at_least, positive_float as _positive_float

DATASETS = ("omniglot", "miniimagenet", "cifarfs", "fc100", "folder")  # folder: your own ImageFolder (--root)
MODELS = ("conv4", "resnet12")
CHECKPOINT_NAME = "checkpoint.pt"
BEST_NAME = "best.pt"
METRICS_NAME = "metrics.json"
CURVES_NAME = "curves.json"
PLOT_NAME = "training_curves.png"
EVAL_BATCH = 50  # episodes adapted at once during evaluation (memory, not results)

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

_FIXED_ON_RESUME = ("dataset", "ways", "shots", "queries", "model", "width", "inner_lr", "inner_steps", "meta_batch",
                    "meta_lr", "first_order", "meta_sgd", "seed", "train_split")


@dataclasses.dataclass
class VisionConfig:
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

    def resolved(self) -> "VisionConfig":
        """A copy with every None filled from the dataset's preset."""
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset: expected one of {', '.join(DATASETS)}, got {self.dataset!r}")
        preset = dict(PRESETS[self.dataset])
        if self.dataset == "omniglot" and self.ways == 20:
            preset.update(OMNIGLOT_20WAY)
        out = dataclasses.replace(self)
        for k, v in preset.items():
            if getattr(out, k) is None:
                setattr(out, k, v)
        if out.queries is None:
            out.queries = out.shots
        if out.normalize == "imagenet" and out.mean is None:
            out.mean, out.std = list(IMAGENET_MEAN), list(IMAGENET_STD)
        return out.validate()

    def validate(self) -> "VisionConfig":
        for name, minimum in (("ways", 2), ("shots", 1), ("queries", 1), ("eval_queries", 1), ("inner_steps", 1),
                              ("test_inner_steps", 1), ("meta_batch", 1), ("iterations", 1), ("val_every", 0),
                              ("val_episodes", 1), ("eval_episodes", 1), ("checkpoint_every", 0), ("seed", 0),
                              ("width", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
        for name in ("inner_lr", "meta_lr"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {', '.join(MODELS)}, got {self.model!r}")
        allowed = ("train", "trainval") if self.dataset == "omniglot" else ("train",)
        if self.train_split not in allowed:
            raise ValueError(f"train_split must be one of {', '.join(allowed)} for {self.dataset}, got {self.train_split!r}")
        if self.device not in ("cpu", "cuda", "auto"):
            raise ValueError(f"device must be 'cpu', 'cuda' or 'auto', got {self.device!r}")
        if self.dataset != "folder":
            for name in ("image_size", "channels"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} applies to --dataset folder only ({self.dataset} has a fixed size)")
            if self.normalize != "none":
                raise ValueError(f"normalize applies to --dataset folder only, got {self.normalize!r}")
        else:
            if isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or self.image_size < 16:
                raise ValueError(f"image_size must be an integer >= 16 (Conv4 halves it 4 times), got {self.image_size!r}")
            if self.channels not in (1, 3):
                raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {self.channels!r}")
            if self.normalize not in NORMALIZE:
                raise ValueError(f"normalize must be one of {', '.join(NORMALIZE)}, got {self.normalize!r}")
            if self.normalize == "imagenet" and self.channels != 3:
                raise ValueError("normalize 'imagenet' needs channels 3 (use 'dataset' for grayscale)")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "VisionConfig":
        return config_from_dict(cls, d, "vision")


# ----------------------------------------------------------------------------- building blocks
def load_data(dataset: str, root: str, split: str, download: bool = False, config: Optional[VisionConfig] = None):
    """The ImageSplit of ``dataset``'s ``split`` under ``root`` (``config``: the folder dataset's options)."""
    if dataset == "folder":
        from ..data.folder import FolderDataset
        if config is None:
            raise ValueError("load_data: the folder dataset needs the run's config (image size, channels)")
        queries = config.queries if split in ("train", "trainval") else config.eval_queries
        return FolderDataset(root, split=split, image_size=config.image_size, channels=config.channels,
                             split_seed=config.split_seed, min_classes=config.ways,
                             min_images=config.shots + queries)
    if dataset == "omniglot":
        from ..data.omniglot import Omniglot
        return Omniglot(root, split=split, download=download)
    if dataset == "miniimagenet":
        from ..data.miniimagenet import MiniImageNet
        return MiniImageNet(root, split=split, download=download)
    from ..data.cifar import CIFARFS, FC100
    return (CIFARFS if dataset == "cifarfs" else FC100)(root, split=split, download=download)


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
    from ..algorithms.batched_maml import BatchedMAML

    maml = BatchedMAML(build_model(config), inner_lr=config.inner_lr, inner_steps=config.inner_steps,
                       first_order=config.first_order, meta_sgd=config.meta_sgd, loss="cross_entropy").to(device)
    return maml, torch.optim.Adam(maml.parameters(), lr=config.meta_lr)


def evaluate(maml, sampler, episodes: int, steps: int, seed: Optional[int] = None) -> dict:
    """Accuracy over ``episodes`` fixed episodes of ``sampler`` after ``steps`` inner steps:
    mean, 95% CI half-width (1.96 std / sqrt(n)) and the per-episode accuracies."""
    from ..data.episodes import EVAL_SEED

    accs = []
    for ep in sampler.fixed_episodes(count=episodes, batch=EVAL_BATCH, seed=EVAL_SEED if seed is None else seed):
        fast = maml.adapt(ep.support_x, ep.support_y, steps=steps)
        with torch.no_grad():
            out = maml.predict(fast, ep.query_x)
        accs.append((out.argmax(-1) == ep.query_y).to(torch.float64).mean(1).cpu())
    accs = torch.cat(accs)
    ci = 1.96 * accs.std().item() / math.sqrt(accs.numel()) if accs.numel() > 1 else float("nan")
    return {"accuracy": accs.mean().item(), "ci95": ci, "episodes": accs.numel(), "steps": steps,
            "per_episode": accs.tolist()}


def _rng_state(device) -> dict:
    state = {"torch_cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, device) -> None:
    torch.set_rng_state(state["torch_cpu"])
    if device.type == "cuda" and "torch_cuda" in state:
        torch.cuda.set_rng_state_all(state["torch_cuda"])


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
    return f"MAML {c.dataset} {c.ways}-way {c.shots}-shot ({c.model})"


# ----------------------------------------------------------------------------- training
def train_vision(config: VisionConfig, out_dir: str, resume: bool = False, progress: bool = True,
                 callback: Optional[Callable[[int], None]] = None, log: Callable[[str], None] = print,
                 plot: bool = True) -> dict:
    """Meta-train (or with ``resume`` continue) in ``out_dir``; returns the metrics dict."""
    from ..data.episodes import EpisodeSampler

    config = config.resolved()
    device = resolve_device(config.device)
    ckpt_path = os.path.join(out_dir, CHECKPOINT_NAME)
    best_path = os.path.join(out_dir, BEST_NAME)
    state = resume_state(out_dir, resume, "vision", config, _FIXED_ON_RESUME)

    # data first: a missing dataset fails before anything is written
    train_data = load_data(config.dataset, config.root, config.train_split, config.download, config)
    validate = config.val_every > 0 and config.train_split == "train"
    val_data = load_data(config.dataset, config.root, "val", config.download, config) if validate else None
    if config.normalize == "dataset" and config.mean is None:
        from ..data.folder import channel_stats
        config.mean, config.std = channel_stats(train_data)
    os.makedirs(out_dir, exist_ok=True)

    torch.manual_seed(config.seed)
    maml, optimizer = build(config, device)
    sampler = EpisodeSampler(train_data, config.ways, config.shots, config.queries, device=device, seed=config.seed,
                             mean=config.mean, std=config.std)
    val_sampler = (EpisodeSampler(val_data, config.ways, config.shots, config.eval_queries, device=device,
                                  mean=config.mean, std=config.std) if validate else None)
    running, running_acc = RunningLoss(), RunningLoss()
    history = {"train": [], "val": []}
    best = {"accuracy": -1.0, "iteration": 0}
    start, seconds_before = 0, 0.0
    if state is not None:
        maml.load_state_dict(state["maml"])
        optimizer.load_state_dict(state["optimizer"])
        sampler.load_state_dict(state["sampler"])
        running = RunningLoss.from_state(state["running_loss"], device=device)
        running_acc = RunningLoss.from_state(state["running_acc"], device=device)
        history, best = state["history"], state["best"]
        start, seconds_before = state["iteration"], state.get("train_seconds", 0.0)
        _set_rng_state(state["rng"], device)
        log(f"resuming {out_dir} at iteration {start}/{config.iterations}")
    iteration = start

    def save() -> str:
        save_checkpoint({"task": "vision", "config": config.to_dict(), "iteration": iteration,
                         "maml": maml.state_dict(), "optimizer": optimizer.state_dict(),
                         "sampler": sampler.state_dict(), "rng": _rng_state(device),
                         "running_loss": running.state(), "running_acc": running_acc.state(),
                         "history": history, "best": best,
                         "train_seconds": seconds_before + (time.perf_counter() - t0)}, ckpt_path)
        return ckpt_path

    def save_best(val: Optional[dict]) -> None:
        save_checkpoint({"task": "vision", "config": config.to_dict(), "iteration": iteration,
                         "maml": maml.state_dict(), "val": None if val is None else
                         {k: v for k, v in val.items() if k != "per_episode"}}, best_path)

    bar = progress_bar(config.iterations, initial=start, enabled=progress)
    mid_step = False
    t0 = time.perf_counter()
    log_every = max(1, min(50, config.iterations // 20))
    try:
        with DeferredInterrupt() as interrupt:
            while iteration < config.iterations:
                if interrupt.requested:
                    raise KeyboardInterrupt
                mid_step = True
                batch = sampler.sample(config.meta_batch)
                out = maml(batch.support_x, batch.support_y, batch.query_x, batch.query_y)
                optimizer.zero_grad(set_to_none=True)
                out.loss.backward()
                optimizer.step()
                running.update(out.loss)
                running_acc.update(out.task_accuracies.mean())
                iteration += 1
                if iteration % log_every == 0 or iteration == config.iterations:
                    history["train"].append({"iteration": iteration, "loss": running.value(),
                                             "accuracy": running_acc.value()})
                    bar.set_postfix(loss=f"{running.value():.3f}", acc=f"{running_acc.value():.3f}", refresh=False)
                if validate and (iteration % config.val_every == 0 or iteration == config.iterations):
                    val = evaluate(maml, val_sampler, config.val_episodes, config.test_inner_steps)
                    history["val"].append({"iteration": iteration, "accuracy": val["accuracy"], "ci95": val["ci95"]})
                    if val["accuracy"] > best["accuracy"]:
                        best = {"accuracy": val["accuracy"], "ci95": val["ci95"], "iteration": iteration}
                        save_best(val)
                mid_step = False
                bar.update(1)
                if config.checkpoint_every and iteration % config.checkpoint_every == 0 \
                        and iteration < config.iterations:
                    save()
                if callback is not None:
                    callback(iteration)
    except KeyboardInterrupt:
        if mid_step:
            raise TrainingInterrupted(f"interrupted inside iteration {iteration + 1}; not saving a possibly "
                                      f"inconsistent state (the last checkpoint, if any, is in {out_dir})",
                                      out_dir, None, iteration) from None
        path = save()
        raise TrainingInterrupted(f"interrupted at iteration {iteration}/{config.iterations}; checkpoint saved to "
                                  f"{path}", out_dir, path, iteration) from None
    finally:
        bar.close()
    train_seconds = time.perf_counter() - t0
    if not validate:
        best = {"accuracy": None, "iteration": iteration}
        save_best(None)
    save()
    write_json(os.path.join(out_dir, CURVES_NAME), history)
    written = [ckpt_path, best_path, os.path.join(out_dir, CURVES_NAME)]
    if plot:
        written.append(plot_curves(os.path.join(out_dir, PLOT_NAME), history, _title(config)))
    metrics = evaluate_checkpoint(best_path, root=config.root, device=config.device, log=log,
                                  out=os.path.join(out_dir, METRICS_NAME),
                                  extra={"best_val": best, "train_loss": running.value(),
                                         "timing": {"iterations_this_run": iteration - start,
                                                    "train_seconds_this_run": train_seconds,
                                                    "ms_per_iteration": 1e3 * train_seconds / max(1, iteration - start),
                                                    "train_seconds_total": seconds_before + train_seconds}})
    written.append(os.path.join(out_dir, METRICS_NAME))
    log("wrote " + ", ".join(written))
    return metrics


# ----------------------------------------------------------------------------- evaluation
def evaluate_checkpoint(path: str, root: Optional[str] = None, split: str = "test", episodes: Optional[int] = None,
                        steps: Optional[int] = None, device: str = "auto", out: Optional[str] = None,
                        log: Callable[[str], None] = print, extra: Optional[dict] = None,
                        download: bool = False) -> dict:
    """Mean accuracy +- 95% CI of a checkpoint (best.pt, checkpoint.pt or a run directory) on the
    fixed episodes of ``split``; writes metrics.json (``out``, default beside the checkpoint)."""
    from ..data.episodes import EpisodeSampler

    if os.path.isdir(path):
        path = os.path.join(path, BEST_NAME if os.path.isfile(os.path.join(path, BEST_NAME)) else CHECKPOINT_NAME)
    state = load_checkpoint(path)
    if state.get("task") != "vision":
        raise ValueError(f"{path} is a checkpoint of task {state.get('task')!r}; `metafast eval` evaluates few-shot "
                         "vision checkpoints (metafast train --dataset omniglot|miniimagenet|cifarfs|fc100|folder)")
    config = VisionConfig.from_dict(state["config"])
    dev = resolve_device(device)
    data = load_data(config.dataset, root or config.root, split, download, config)
    maml, _ = build(config, dev)
    maml.load_state_dict(state["maml"])
    n = config.eval_episodes if episodes is None else episodes
    s = config.test_inner_steps if steps is None else steps
    sampler = EpisodeSampler(data, config.ways, config.shots, config.eval_queries, device=dev, mean=config.mean,
                             std=config.std)
    t0 = time.perf_counter()
    result = evaluate(maml, sampler, n, s)
    seconds = time.perf_counter() - t0
    log(f"{config.dataset} {split}: {config.ways}-way {config.shots}-shot accuracy "
        f"{100 * result['accuracy']:.2f}% +- {100 * result['ci95']:.2f}% (95% CI, {n} episodes, {s} inner steps, "
        f"{config.eval_queries} queries per class)")
    metrics = {"task": "vision", "dataset": config.dataset, "split": split, "ways": config.ways,
               "shots": config.shots, "accuracy": result["accuracy"], "ci95": result["ci95"], "episodes": n,
               "inner_steps": s, "queries_per_class": config.eval_queries, "checkpoint": os.path.abspath(path),
               "checkpoint_iteration": state["iteration"], "config": config.to_dict(),
               "device": f"cuda ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda"
               else f"cpu ({torch.get_num_threads()} threads)", "eval_seconds": seconds,
               "versions": {"python": platform.python_version(), "torch": torch.__version__}}
    if extra:
        metrics.update(extra)
    metrics["per_episode_accuracy"] = result["per_episode"]
    write_json(out or os.path.join(os.path.dirname(os.path.abspath(path)), METRICS_NAME), metrics)
    return metrics


# ----------------------------------------------------------------------------- command line
# options `metafast train` already has for the sinusoid job (same names, same meaning)
_COMMON_TRAIN = [
    ("--iterations", dict(type=_int_at_least(1), help="meta-iterations (vision default: the preset's, 60000)")),
    ("--meta-batch", dict(type=_int_at_least(1), help="tasks per meta-batch")),
    ("--inner-lr", dict(type=_positive_float, help="inner-loop SGD learning rate")),
    ("--inner-steps", dict(type=_int_at_least(1), help="inner-loop steps during meta-training")),
    ("--meta-lr", dict(type=_positive_float, help="Adam learning rate of the meta-update")),
    ("--first-order", dict(action="store_true", default=None, help="first-order MAML")),
    ("--meta-sgd", dict(action="store_true", default=None, help="learn per-parameter inner learning rates")),
    ("--seed", dict(type=_int_at_least(0), help="seed of initialisation and training episodes (default 0)")),
    ("--device", dict(choices=("cpu", "cuda", "auto"), help="where to train (default auto)")),
    ("--checkpoint-every", dict(type=_int_at_least(0), metavar="N", help="save checkpoint.pt every N iterations")),
    ("--out", dict(metavar="DIR", help="output directory (default runs/<timestamp>)")),
    ("--resume", dict(metavar="DIR", help="continue the interrupted run in DIR exactly")),
    ("--no-progress", dict(action="store_true", help="no progress bar")),
]
_VISION_TRAIN = [
    ("--root", dict(metavar="DIR", help="dataset folder (vision datasets; default ./data)")),
    ("--download", dict(action="store_true", default=None, help="fetch the dataset with torchvision when missing")),
    ("--ways", dict(type=_int_at_least(2), help="classes per task (vision; default 5)")),
    ("--shots", dict(type=_int_at_least(1), help="support images per class (vision; default 1)")),
    ("--queries", dict(type=_int_at_least(1), help="query images per class in training (default: the preset's)")),
    ("--eval-queries", dict(type=_int_at_least(1), help="query images per class in validation/test (default 15)")),
    ("--test-inner-steps", dict(type=_int_at_least(1), help="inner steps at validation/test (default: the preset's)")),
    ("--model", dict(choices=MODELS, help="network (default conv4, the paper's)")),
    ("--width", dict(type=_int_at_least(1), help="Conv4 channels (default: the preset's)")),
    ("--val-every", dict(type=_int_at_least(0), metavar="N", help="validate every N iterations, 0 = never (default 500)")),
    ("--val-episodes", dict(type=_int_at_least(1), help="fixed validation episodes (default 100)")),
    ("--eval-episodes", dict(type=_int_at_least(1), help="fixed test episodes at the end (default 600)")),
    ("--train-split", dict(choices=("train", "trainval"), help="omniglot: 'trainval' trains on all 1200 characters")),
    ("--image-size", dict(type=_int_at_least(16), help="folder: side of the resized square images (default 84)")),
    ("--channels", dict(type=int, choices=(1, 3), help="folder: 1 grayscale or 3 RGB (default 3)")),
    ("--normalize", dict(choices=NORMALIZE, help="folder: 'none' pixels in [0, 1] (default), 'dataset' per-channel "
                                                 "train-split mean/std, 'imagenet' ImageNet's")),
    ("--split-seed", dict(type=_int_at_least(0), help="folder without train/val/test folders: the seed that splits "
                                                      "the classes 64/16/20 (default 0)")),
]
_FIELDS = ("root", "download", "ways", "shots", "queries", "eval_queries", "test_inner_steps", "model", "width",
           "iterations", "meta_batch", "inner_lr", "inner_steps", "meta_lr", "first_order", "meta_sgd",
           "val_every", "val_episodes", "eval_episodes", "checkpoint_every", "train_split", "seed", "device",
           "image_size", "channels", "normalize", "split_seed")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the vision options (and any of the shared ones the parser lacks) to a `train` parser."""
    have = set(parser._option_string_actions)
    for flag, kw in _COMMON_TRAIN + _VISION_TRAIN:
        if flag not in have:
            parser.add_argument(flag, **kw)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `eval`: evaluate a few-shot vision checkpoint on the fixed test episodes."""
    p = subparsers.add_parser("eval", help="evaluate a few-shot checkpoint on the 600 fixed test episodes",
                              description="Mean accuracy +- 95%% CI of a checkpoint written by `metafast train "
                                          "--dataset ...` on fixed episodes; writes metrics.json.")
    p.add_argument("checkpoint", help="best.pt, checkpoint.pt or a run directory (uses its best.pt)")
    p.add_argument("--root", metavar="DIR", help="dataset folder (default: the one used in training)")
    p.add_argument("--split", choices=("test", "val"), default="test", help="default test")
    p.add_argument("--episodes", type=_int_at_least(1), help="default: the run's eval episodes (600)")
    p.add_argument("--steps", type=_int_at_least(0), help="inner steps (default: the run's test steps)")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")
    p.add_argument("--out", metavar="FILE", help="metrics file (default metrics.json beside the checkpoint)")
    p.set_defaults(handler=main)
    return p


def build_parser() -> argparse.ArgumentParser:
    """A standalone `metafast`-style parser with `train` (vision datasets) and `eval`."""
    parser = argparse.ArgumentParser(prog="metafast")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    t = sub.add_parser("train", help="meta-train MAML on a few-shot vision dataset")
    t.add_argument("--dataset", choices=DATASETS, required=True)
    add_train_arguments(t)
    t.set_defaults(handler=main)
    add_parser(sub)
    return parser


def _train_cmd(args) -> int:
    given = {k: getattr(args, k) for k in _FIELDS if getattr(args, k, None) is not None}
    if args.resume:
        if args.out is not None and os.path.abspath(args.out) != os.path.abspath(args.resume):
            raise ValueError("--out and --resume both given: a resumed run writes into the directory it resumes")
        state = load_checkpoint(args.resume)
        if state.get("task") != "vision":
            raise ValueError(f"--resume {args.resume}: the checkpoint is of task {state.get('task')!r}, not a "
                             f"{args.dataset} run")
        saved = VisionConfig.from_dict(state["config"])
        if saved.dataset != args.dataset:
            raise ValueError(f"--resume {args.resume}: the run is on {saved.dataset!r}, not {args.dataset!r}")
        config, out_dir = dataclasses.replace(saved, **given), args.resume
    else:
        config, out_dir = VisionConfig(dataset=args.dataset, **given), args.out or new_run_dir()
    try:
        train_vision(config, out_dir, resume=bool(args.resume), progress=not args.no_progress)
    except TrainingInterrupted as e:
        print(f"\n{e}", file=sys.stderr)
        if e.checkpoint is not None or os.path.exists(os.path.join(e.out_dir, CHECKPOINT_NAME)):
            print(f"resume with: metafast train --dataset {config.dataset} --resume {e.out_dir}", file=sys.stderr)
        return 130
    return 0


def _eval_cmd(args) -> int:
    evaluate_checkpoint(args.checkpoint, root=args.root, split=args.split, episodes=args.episodes, steps=args.steps,
                        device=args.device, out=args.out)
    return 0


def main(args) -> int:
    """Run `train --dataset <vision dataset>` or `eval` from parsed arguments; user errors are
    printed as `metafast <command>: error: ...` with exit status 2."""
    if isinstance(args, (list, tuple)):
        try:
            args = build_parser().parse_args(list(args))
        except SystemExit as e:
            return e.code if isinstance(e.code, int) else 2
    try:
        return _eval_cmd(args) if args.command == "eval" else _train_cmd(args)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"metafast {args.command}: error: {e}", file=sys.stderr)
        return 2
