"""``metafast multitask``: the default multi-task job (metafast.jobs.multitask): one training run per
loss weighting strategy on related synthetic tasks, and their per-task test accuracy."""
import argparse

import torch

from ..jobs.multitask import MultiTaskJob
from ..multitask.weighting import STRATEGIES
from ..runtime.arguments import int_at_least, non_negative_float
from ..runtime.command import add_run_arguments, given_options, job_config, reports_errors, run_job

# Options that map onto MultiTaskConfig fields; None means "not given" (defaults, or the checkpoint's).
_FIELDS = ("iterations", "strategies", "tasks", "alpha", "seed", "device", "checkpoint_every")


def _strategies(text: str) -> tuple:
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in names if s not in STRATEGIES]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(STRATEGIES)}, got {text!r}")
    return names


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "multitask", help="multi-task training: compare loss weighting strategies (default: synthetic tasks)",
        description="Train a shared trunk with one head per task on several related synthetic classification "
                    "tasks (label noise rising over the tasks), once per loss weighting strategy (equal, "
                    "uncertainty, gradnorm), and report per-task test accuracy. Under a minute on 2 CPU cores.")
    p.add_argument("--iterations", type=int_at_least(1), help="steps per strategy (default 3000)")
    p.add_argument("--strategies", type=_strategies, help="comma-separated (default equal,uncertainty,gradnorm)")
    p.add_argument("--tasks", type=int_at_least(1), help="number of tasks (default 6)")
    p.add_argument("--alpha", type=non_negative_float, help="GradNorm alpha (default 1.5)")
    p.add_argument("--seed", type=int_at_least(0), help="seed of data, initialisation and batches (default 0)")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), help="where to train (default auto)")
    p.add_argument("--checkpoint-every", type=int_at_least(0), metavar="N",
                   help="save a checkpoint every N steps, 0 = only after each strategy (default 500)")
    p.add_argument("--threads", type=int_at_least(1), default=1,
                   help="CPU threads (default 1: the model is small, and a second intra-op thread mostly adds "
                        "wake-up stalls)")
    add_run_arguments(p, prefix="multitask-")
    p.set_defaults(handler=main)
    return p


@reports_errors
def main(args: argparse.Namespace) -> int:
    config, out_dir = job_config(args, MultiTaskJob, given_options(args, _FIELDS), prefix="multitask-")
    torch.set_num_threads(args.threads)
    job = MultiTaskJob(config, out_dir, resume=bool(args.resume), progress=not args.no_progress)
    return run_job(job, f"metafast multitask --resume {out_dir}")
