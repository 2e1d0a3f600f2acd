"""``metafast multitask``: the default multi-task job (see metafast.multitask.job) from the command line.

``add_parser(subparsers)`` registers the subcommand; ``main(args)`` runs it and returns the exit status
(0 done, 2 bad arguments, 130 interrupted with a checkpoint to resume).
"""
import argparse
import dataclasses
import os
import sys
from ..train.arguments import int_at_least as _int_at_least
from ..train.run import new_run_dir

PROG = "metafast multitask"
# Options that map onto MultiTaskConfig fields; None means "not given" (defaults, or the checkpoint's).
_FIELDS = ("iterations", "strategies", "tasks", "alpha", "seed", "device", "checkpoint_every")


def _strategies(text: str) -> tuple:
    from .weighting import STRATEGIES

    names = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in names if s not in STRATEGIES]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(STRATEGIES)}, got {text!r}")
    return names


def _alpha(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "multitask", help="multi-task training: compare loss weighting strategies (default: synthetic tasks)",
        description="Train a shared trunk with one head per task on several related synthetic classification "
                    "tasks (label noise rising over the tasks), once per loss weighting strategy (equal, "
                    "uncertainty, gradnorm), and report per-task test accuracy. Under a minute on 2 CPU cores.")
    p.add_argument("--iterations", type=_int_at_least(1), help="steps per strategy (default 3000)")
    p.add_argument("--strategies", type=_strategies, help="comma-separated (default equal,uncertainty,gradnorm)")
    p.add_argument("--tasks", type=_int_at_least(1), help="number of tasks (default 6)")
    p.add_argument("--alpha", type=_alpha, help="GradNorm alpha (default 1.5)")
    p.add_argument("--seed", type=_int_at_least(0), help="seed of data, initialisation and batches (default 0)")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), help="where to train (default auto)")
    p.add_argument("--checkpoint-every", type=_int_at_least(0), metavar="N",
                   help="save a checkpoint every N steps, 0 = only after each strategy (default 500)")
    p.add_argument("--threads", type=_int_at_least(1), default=1,
                   help="CPU threads (default 1: the model is small, and a second intra-op thread mostly adds "
                        "wake-up stalls)")
    p.add_argument("--out", metavar="DIR", help="output directory (default runs/multitask-<timestamp>)")
    p.add_argument("--resume", metavar="DIR", help="continue the interrupted run in DIR exactly")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=main)
    return p


def _error(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def main(args) -> int:
    from ..train.checkpoint import CHECKPOINT_NAME, load_checkpoint
    from .job import MultiTaskConfig, TrainingInterrupted, check_resume_config, run_multitask

    given = {k: getattr(args, k, None) for k in _FIELDS}
    given = {k: v for k, v in given.items() if v is not None}
    out = getattr(args, "out", None)
    resume = getattr(args, "resume", None)
    if resume:
        if out is not None and os.path.abspath(out) != os.path.abspath(resume):
            return _error("--out and --resume both given: a resumed run writes into the directory it resumes")
        try:
            state = load_checkpoint(resume)
        except (FileNotFoundError, ValueError) as e:
            return _error(f"--resume {resume}: {e}")
        if state.get("task") != "multitask":
            return _error(f"--resume {resume}: the checkpoint is of task {state.get('task')!r}, not 'multitask'")
        saved = MultiTaskConfig.from_dict(state["config"])
        config = dataclasses.replace(saved, **given)
        try:
            check_resume_config(saved, config)
        except ValueError as e:
            return _error(f"--resume {resume}: {e}")
        out_dir = resume
    else:
        config = MultiTaskConfig(**given)
        out_dir = out or new_run_dir("multitask-")
    try:
        config.validate()
        import torch

        torch.set_num_threads(getattr(args, "threads", 1))
        run_multitask(config, out_dir, resume=bool(resume), progress=not getattr(args, "no_progress", False))
    except TrainingInterrupted as e:
        print(f"\n{e}", file=sys.stderr)
        if e.checkpoint is not None or os.path.exists(os.path.join(e.out_dir, CHECKPOINT_NAME)):
            print(f"resume with: metafast multitask --resume {e.out_dir}", file=sys.stderr)
        return 130
    except ValueError as e:
        return _error(str(e))
    return 0
