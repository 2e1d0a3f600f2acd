"""The default distillation job: a synthetic classification task generated in code, a wide teacher
MLP, and a narrow student MLP trained twice, from scratch on the hard labels and distilled from the
teacher with :func:`kd_loss`. Held-out accuracy of all three goes to ``metrics.json``.

Distillation uses the teacher's soft targets on the labelled inputs plus ``transfer_size`` unlabelled
inputs from the same distribution (Hinton et al.'s transfer set), with no hard labels (``target=None``:
alpha then scales the KD term alone); the scratch student sees only the labelled examples. With
``transfer_size=0`` the distilled student trains on the labelled set with alpha * KD + (1 - alpha) * CE.

Data: inputs are drawn from a mixture of Gaussian clusters in ``features`` dimensions, several
clusters per class placed at random (so classes are multi-modal and overlap: the Bayes error is
not zero and the teacher's soft targets carry information the hard labels do not). Everything is
a pure function of the seed.

Phases (teacher, scratch, distilled) each checkpoint into their own sub-directory; ``resume``
finishes the phase that was interrupted and skips the finished ones, so the final metrics equal
those of an uninterrupted run.

Under torchrun every phase is data parallel (see metafast.distill.distiller): ``batch_size`` is the
global batch, split across the ranks, so a run of W processes computes what one process computes
(up to the rounding of the gradient sum) and resumes with any W. Rank 0 alone prints, evaluates and
writes config, checkpoints and metrics; the output directory must be visible to every rank (resume
reads it on all of them).
"""
import dataclasses
import json
import os
import time
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from .. import distributed
from ..distill.distiller import Distiller, DistillInterrupted, accuracy
from ..runtime.checkpoint import CHECKPOINT_NAME, write_json
from ..runtime.config import JobConfig
from ..runtime.job import Job

CONFIG_NAME = "config.json"
PHASES = ("teacher", "scratch", "distilled")


@dataclasses.dataclass
class DistillConfig(JobConfig):
    seed: int = 0
    features: int = 16
    classes: int = 10
    clusters_per_class: int = 3
    train_size: int = 1000     # labelled examples (teacher and scratch student train on these)
    transfer_size: int = 20000  # unlabelled inputs the teacher labels softly for distillation
    test_size: int = 4000
    teacher_hidden: int = 128
    student_hidden: int = 32
    teacher_steps: int = 1500
    student_steps: int = 1500
    batch_size: int = 128
    lr: float = 3e-3
    temperature: float = 4.0
    alpha: float = 0.9
    checkpoint_every: int = 1000  # 0: only at the end of each phase and on Ctrl-C

    def validate(self) -> "DistillConfig":
        self.check_ints((("features", 1), ("classes", 2), ("clusters_per_class", 1), ("train_size", 1),
                         ("transfer_size", 0), ("test_size", 1), ("teacher_hidden", 1), ("student_hidden", 1),
                         ("teacher_steps", 0), ("student_steps", 0), ("batch_size", 1), ("checkpoint_every", 0),
                         ("seed", 0)))
        self.check_positive(("lr", "temperature"))
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha!r}")
        return self


# ---------------------------------------------------------------------------------------- data
def make_dataset(config: DistillConfig) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(x_train, y_train, x_transfer, x_test, y_test), float32 / int64 on the CPU, a pure function of
    the seed. The transfer inputs come without labels."""
    g = torch.Generator().manual_seed(10_000 + config.seed)
    k = config.classes * config.clusters_per_class
    centers = torch.randn(k, config.features, generator=g) * 1.3
    cluster_class = torch.arange(k) % config.classes
    scales = 0.6 + 0.6 * torch.rand(k, generator=g)  # clusters of different spread

    def sample(n: int):
        c = torch.randint(0, k, (n,), generator=g)
        x = centers[c] + torch.randn(n, config.features, generator=g) * scales[c, None]
        return x, cluster_class[c]

    x_train, y_train = sample(config.train_size)
    x_transfer, _ = sample(config.transfer_size)
    x_test, y_test = sample(config.test_size)
    return x_train, y_train, x_transfer, x_test, y_test


def mlp(features: int, hidden: int, classes: int, depth: int) -> nn.Sequential:
    layers, d = [], features
    for _ in range(depth):
        layers += [nn.Linear(d, hidden), nn.ReLU()]
        d = hidden
    return nn.Sequential(*layers, nn.Linear(d, classes))


class ConstantLogits(nn.Module):
    """A stand-in teacher with all-zero logits: with alpha = 0 the KD term has weight 0 and the
    Distiller trains on the hard labels alone (plain cross-entropy)."""

    def __init__(self, classes: int):
        super().__init__()
        self.classes = classes

    def forward(self, x: Tensor) -> Tensor:
        return x.new_zeros(x.shape[0], self.classes)


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------- job
def _phase(name: str, config: DistillConfig, out_dir: str, teacher: Optional[nn.Module], x: Tensor, y: Tensor,
           progress: bool) -> Tuple[nn.Module, Dict[str, float]]:
    """Train one model; returns it and {"steps", "loss", "seconds"}. A finished phase is loaded, not retrained."""
    if name == "teacher":
        torch.manual_seed(config.seed * 1000)
        model = mlp(config.features, config.teacher_hidden, config.classes, depth=2)
    else:
        torch.manual_seed(config.seed * 1000 + 1)  # the same initial student for scratch and distilled
        model = mlp(config.features, config.student_hidden, config.classes, depth=1)
    if name == "distilled":
        alpha, steps = config.alpha, config.student_steps
    else:  # plain cross-entropy on the hard labels
        teacher, alpha = ConstantLogits(config.classes), 0.0
        steps = config.teacher_steps if name == "teacher" else config.student_steps
    distiller = Distiller(teacher, model, temperature=config.temperature, alpha=alpha, lr=config.lr,
                          seed=config.seed * 1000 + PHASES.index(name))
    phase_dir = os.path.join(out_dir, name)
    resume = os.path.exists(os.path.join(phase_dir, CHECKPOINT_NAME))
    distributed.barrier()  # every rank has looked before rank 0 can write this phase's first checkpoint
    t0 = time.perf_counter()
    result = distiller.fit(x, y, steps=steps, batch_size=config.batch_size, out_dir=phase_dir,
                           checkpoint_every=config.checkpoint_every, resume=resume, progress=progress, desc=name)
    result["seconds"] = time.perf_counter() - t0
    model.eval()
    return model, result


def run_distill_job(config: DistillConfig, out_dir: str, resume: bool = False, progress: bool = True) -> Optional[dict]:
    """Run (or finish) the job in ``out_dir``; returns the metrics written to metrics.json (None on
    ranks other than 0 of a distributed run). Raises DistillInterrupted on Ctrl-C (after
    checkpointing). Launched by torchrun with WORLD_SIZE > 1 it joins the process group (gloo: the
    job runs on the CPU) and leaves it at the end, unless the caller already did."""
    return DistillJob(config, out_dir, resume, progress).run()


class DistillJob(Job):
    """The run's settings live in config.json and all of them are kept on resume; each phase
    checkpoints in its own sub-directory (Distiller.fit), so a resume finishes the interrupted phase."""
    task = "distill"
    config_type = DistillConfig
    interrupted = (DistillInterrupted,)

    @classmethod
    def read_saved(cls, out_dir: str):
        path = os.path.join(out_dir, CONFIG_NAME)
        if not os.path.isfile(path):
            raise ValueError(f"{out_dir} holds no {CONFIG_NAME}: nothing to resume")
        with open(path) as f:
            return DistillConfig.from_dict(json.load(f)), {}

    @classmethod
    def check_resume(cls, saved: DistillConfig, wanted: DistillConfig, state: dict) -> None:
        diffs = [f"{k} (run has {v!r}, asked for {getattr(wanted, k)!r})"
                 for k, v in saved.to_dict().items() if getattr(wanted, k) != v]
        if diffs:
            raise ValueError("a resumed run must keep its settings; cannot change " + ", ".join(diffs))

    @classmethod
    def holds_run(cls, out_dir: str) -> bool:
        return os.path.exists(os.path.join(out_dir, CONFIG_NAME))

    def open(self, create: bool = True) -> None:
        if self.resume:
            return super().open(create)
        if self.holds_run(self.out_dir):
            raise ValueError(f"{self.out_dir} already holds a run; resume it or pick another output directory")
        distributed.barrier()  # every rank has checked before rank 0 writes
        if self.main:
            write_json(os.path.join(self.out_dir, CONFIG_NAME), self.config.to_dict())

    def execute(self, device: torch.device) -> Optional[dict]:
        self.open()
        if self.world > 1:
            self.log(f"distributed: {self.world} processes (gloo), batch {self.config.batch_size} split across them")
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # small MLPs: more threads only add overhead, and stall on a busy machine
        try:
            return _run(self, self.config, self.out_dir, self.progress)
        finally:
            torch.set_num_threads(threads)


def _run(job: DistillJob, config: DistillConfig, out_dir: str, progress: bool) -> Optional[dict]:
    x_train, y_train, x_transfer, x_test, y_test = make_dataset(config)
    teacher, r_teacher = _phase("teacher", config, out_dir, None, x_train, y_train, progress)
    scratch, r_scratch = _phase("scratch", config, out_dir, None, x_train, y_train, progress)
    if config.transfer_size:  # labelled and transfer inputs, soft targets only (alpha scales the KD term)
        x_kd, y_kd = torch.cat([x_train, x_transfer]), None
    else:
        x_kd, y_kd = x_train, y_train
    distilled, r_distilled = _phase("distilled", config, out_dir, teacher, x_kd, y_kd, progress)
    if not distributed.is_main():  # evaluation and metrics are rank 0's
        return None

    metrics = {
        "teacher_accuracy": accuracy(teacher, x_test, y_test),
        "scratch_student_accuracy": accuracy(scratch, x_test, y_test),
        "distilled_student_accuracy": accuracy(distilled, x_test, y_test),
        "distilled_student_agreement_with_teacher": Distiller(teacher, distilled).evaluate(x_test, y_test)["agreement"],
        "teacher_train_accuracy": accuracy(teacher, x_train, y_train),
        "teacher_parameters": _count(teacher),
        "student_parameters": _count(scratch),
        "final_loss": {"teacher": r_teacher["loss"], "scratch": r_scratch["loss"], "distilled": r_distilled["loss"]},
        "seconds": {"teacher": r_teacher["seconds"], "scratch": r_scratch["seconds"],
                    "distilled": r_distilled["seconds"]},
        "config": config.to_dict(),
        "held_out_examples": config.test_size,
        "labelled_examples": config.train_size,
        "transfer_examples": config.transfer_size,
        "torch": torch.__version__,
    }
    job.write_metrics(metrics)
    return metrics


def format_results(metrics: dict) -> str:
    return (f"held-out accuracy ({metrics['held_out_examples']} examples):\n"
            f"  teacher ({metrics['teacher_parameters']} params)            {metrics['teacher_accuracy']:.4f}\n"
            f"  student from scratch ({metrics['student_parameters']} params) {metrics['scratch_student_accuracy']:.4f}\n"
            f"  distilled student ({metrics['student_parameters']} params)    {metrics['distilled_student_accuracy']:.4f}")
