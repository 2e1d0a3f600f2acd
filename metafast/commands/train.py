"""``metafast train``: meta-train MAML. With no arguments the default job, sinusoid regression with the
MAML paper's setup (metafast.jobs.sinusoid); ``--dataset omniglot|miniimagenet|cifarfs|fc100`` trains
on a few-shot image dataset with ``--algorithm maml|fomaml|metasgd|anil|mamlpp|protonet`` (metafast.jobs.vision)."""
import argparse

from .. import distributed
from ..jobs.sinusoid import DEFAULT_CHECKPOINT_EVERY, DEFAULT_ITERATIONS, PAPER_ITERATIONS, SinusoidJob
from ..jobs.vision import ALGORITHMS, DATASETS, MODELS, VisionJob
from ..runtime import allocator
from ..runtime.arguments import int_at_least, positive_float
from ..runtime.command import CommandError, add_run_arguments, given_options, job_config, reports_errors, run_job

# Options that map onto the jobs' config fields; None means "not given" (defaults, or the checkpoint's).
SINUSOID_FIELDS = ("iterations", "meta_batch", "inner_lr", "inner_steps", "meta_lr", "first_order", "meta_sgd",
                   "seed", "device", "checkpoint_every")
VISION_FIELDS = SINUSOID_FIELDS + ("root", "download", "ways", "shots", "queries", "eval_queries",
                                   "test_inner_steps", "model", "width", "val_every", "val_episodes",
                                   "eval_episodes", "train_split", "image_size", "channels", "normalize", "split_seed",
                                   "memory", "task_chunk", "algorithm", "train_ways", "train_shots", "distance")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train", help="meta-train a model (default: MAML on sinusoid regression)",
        description="Meta-train MAML. With no arguments: sinusoid regression with the MAML paper's setup "
                    "(MLP 1-40-40-1, K=10, 1 inner step lr 0.01, meta-batch 25, Adam 1e-3, second order), "
                    f"{DEFAULT_ITERATIONS} iterations (the paper uses --iterations {PAPER_ITERATIONS}).")
    p.add_argument("--dataset", choices=sorted(JOBS), default="sinusoid", help="task family (default: sinusoid)")
    p.add_argument("--iterations", type=int_at_least(1),
                   help=f"meta-iterations (default {DEFAULT_ITERATIONS}; vision: the preset's, 60000)")
    p.add_argument("--meta-batch", type=int_at_least(1),
                   help="tasks per meta-batch (default 25); per process under torchrun, so W processes use W times as many")
    p.add_argument("--inner-lr", type=positive_float, help="inner-loop SGD learning rate (default 0.01)")
    p.add_argument("--inner-steps", type=int_at_least(1), help="inner-loop steps (default 1)")
    p.add_argument("--meta-lr", type=positive_float, help="Adam learning rate of the meta-update (default 1e-3)")
    p.add_argument("--first-order", action="store_true", default=None, help="first-order MAML (default: second order)")
    p.add_argument("--meta-sgd", action="store_true", default=None, help="learn per-parameter inner learning rates")
    p.add_argument("--seed", type=int_at_least(0), help="seed of initialisation and training tasks (default 0)")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), help="where to train (default auto)")
    p.add_argument("--checkpoint-every", type=int_at_least(0), metavar="N",
                   help=f"save a checkpoint every N iterations, 0 = only at the end (default {DEFAULT_CHECKPOINT_EVERY})")
    add_run_arguments(p)
    p.add_argument("--allocator", choices=("keep", "default"), default="keep",
                   help="keep: glibc keeps freed memory for reuse (no fresh pages for each step's large temporaries; "
                        "a third faster Conv4 steps on CPU); default: leave glibc's settings (default keep)")
    # the few-shot image datasets
    p.add_argument("--root", metavar="DIR", help="dataset folder (vision datasets; default ./data)")
    p.add_argument("--download", action="store_true", default=None, help="fetch the dataset with torchvision when missing")
    p.add_argument("--ways", type=int_at_least(2), help="classes per task (vision; default 5)")
    p.add_argument("--shots", type=int_at_least(1), help="support images per class (vision; default 1)")
    p.add_argument("--queries", type=int_at_least(1), help="query images per class in training (default: the preset's)")
    p.add_argument("--eval-queries", type=int_at_least(1), help="query images per class in validation/test (default 15)")
    p.add_argument("--test-inner-steps", type=int_at_least(1), help="inner steps at validation/test (default: the preset's)")
    p.add_argument("--model", choices=MODELS, help="network (default conv4, the paper's)")
    p.add_argument("--width", type=int_at_least(1), help="Conv4 channels (default: the preset's)")
    p.add_argument("--memory", choices=("fast", "low", "min"),
                   help="vision: 'low' recomputes each inner step in the reverse instead of keeping its activations "
                        "(peak independent of --inner-steps, same results); 'min' also replays the inner loop instead "
                        "of keeping its fast weights (default fast)")
    p.add_argument("--task-chunk", type=int_at_least(1), metavar="N",
                   help="vision: run the meta-batch N tasks at a time (same results; with --memory low/min the peak is "
                        "one step of N tasks)")
    p.add_argument("--val-every", type=int_at_least(0), metavar="N",
                   help="validate every N iterations, 0 = never (default 500)")
    p.add_argument("--val-episodes", type=int_at_least(1), help="fixed validation episodes (default 100)")
    p.add_argument("--eval-episodes", type=int_at_least(1), help="fixed test episodes at the end (default 600)")
    p.add_argument("--algorithm", choices=ALGORITHMS,
                   help="vision: maml (second order, the default), fomaml (first order), metasgd (learned "
                        "per-parameter inner rates), anil (only the head adapted), mamlpp (MAML++: learned per-step "
                        "per-layer rates, annealed multi-step loss, first order for 25000 iterations, cosine-annealed "
                        "meta-lr) or protonet (prototypical networks on the network without its classifier; no "
                        "inner loop). --first-order / --meta-sgd alone mean fomaml / metasgd")
    p.add_argument("--train-ways", type=int_at_least(2),
                   help="protonet: classes per training episode (default --ways; Snell et al. train Omniglot 60-way)")
    p.add_argument("--train-shots", type=int_at_least(1),
                   help="protonet: support images per class in training episodes (default --shots); "
                        "--queries sets the training queries")
    p.add_argument("--distance", choices=("euclidean", "cosine"),
                   help="protonet: squared euclidean (default, Snell et al.) or scaled cosine")
    p.add_argument("--train-split", choices=("train", "trainval"),
                   help="omniglot: 'trainval' trains on all 1200 characters")
    # --dataset folder (metafast.data.folder): your own ImageFolder under --root
    p.add_argument("--image-size", type=int_at_least(16), help="folder: side of the resized square images (default 84)")
    p.add_argument("--channels", type=int, choices=(1, 3), help="folder: 1 grayscale or 3 RGB (default 3)")
    p.add_argument("--normalize", choices=("none", "dataset", "imagenet"),
                   help="folder: 'none' pixels in [0, 1] (default), 'dataset' per-channel train-split mean/std, "
                        "'imagenet' ImageNet's")
    p.add_argument("--split-seed", type=int_at_least(0),
                   help="folder without train/val/test folders: the seed that splits the classes 64/16/20 (default 0)")
    p.set_defaults(handler=main)
    return p


@reports_errors
def main(args: argparse.Namespace) -> int:
    if args.allocator == "keep":
        allocator.keep_freed_memory()
    if args.dataset != "sinusoid" and distributed.launched():  # W uncoordinated copies would share --out
        raise CommandError(f"--dataset {args.dataset}: only the sinusoid job runs data parallel under torchrun "
                           f"(WORLD_SIZE={distributed.env_world_size()}); launch it as one process")
    return JOBS[args.dataset](args)


def train_sinusoid(args: argparse.Namespace) -> int:
    config, out_dir = job_config(args, SinusoidJob, given_options(args, SINUSOID_FIELDS))
    job = SinusoidJob(config, out_dir, resume=bool(args.resume), progress=not args.no_progress)
    return run_job(job, f"metafast train --resume {out_dir}")


def train_vision(args: argparse.Namespace) -> int:
    given = dict(given_options(args, VISION_FIELDS), dataset=args.dataset)
    config, out_dir = job_config(args, VisionJob, given)
    job = VisionJob(config, out_dir, resume=bool(args.resume), progress=not args.no_progress)
    return run_job(job, f"metafast train --dataset {config.dataset} --resume {out_dir}")


JOBS = {"sinusoid": train_sinusoid, **{name: train_vision for name in DATASETS}}
