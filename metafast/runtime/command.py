"""What every training command does around its job: the config from the options given (a fresh run,
or ``--resume DIR`` continuing the saved run's config), and the exit status (0 done, 2 a user error
printed as ``metafast <command>: error: ...``, 130 interrupted with a hint how to resume)."""
import argparse
import dataclasses
import functools
import os
import sys
from typing import Callable, Optional, Sequence, Tuple, Type

from ..distributed import DistributedError
from .job import Job
from .run import new_run_dir


class CommandError(Exception):
    """A user-facing error: printed as ``metafast <command>: error: <message>``, exit status 2."""


def add_run_arguments(parser: argparse.ArgumentParser, prefix: str = "",
                      resume_help: str = "continue the interrupted run in DIR exactly") -> None:
    """--out, --resume and --no-progress, which every training command has (``prefix``: of the default
    run directory runs/<prefix><timestamp>)."""
    parser.add_argument("--out", metavar="DIR", help=f"output directory (default runs/{prefix}<timestamp>)")
    parser.add_argument("--resume", metavar="DIR", help=resume_help)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def given_options(args: argparse.Namespace, fields: Sequence[str]) -> dict:
    """The config fields the command line set (None means "not given": defaults, or the saved run's)."""
    return {k: getattr(args, k) for k in fields if getattr(args, k, None) is not None}


def job_config(args: argparse.Namespace, job: Type[Job], given: dict, prefix: str = "") -> Tuple[object, str]:
    """(config, output directory): a fresh run of the defaults updated by ``given`` in ``--out`` (default
    runs/<prefix><timestamp>), or with ``--resume DIR`` the saved run's config updated by ``given``,
    checked as the job checks a resume (so a mistake is reported before anything starts)."""
    if not args.resume:
        return job.config_type(**given), args.out or new_run_dir(prefix)
    if args.out is not None and os.path.abspath(args.out) != os.path.abspath(args.resume):
        raise CommandError("--out and --resume both given: a resumed run writes into the directory it resumes")
    try:
        saved, state = job.read_saved(args.resume)
    except (OSError, ValueError) as e:
        raise CommandError(f"--resume {args.resume}: {e}") from None
    config = dataclasses.replace(saved, **given)
    if "iteration" in state and config.iterations < state["iteration"]:
        raise CommandError(f"--iterations {config.iterations}: the checkpoint in {args.resume} is already at "
                           f"iteration {state['iteration']}")
    try:
        job.check_resume(saved, config, state)
    except ValueError as e:
        raise CommandError(f"--resume {args.resume}: {e}") from None
    return config, args.resume


def run_job(job: Job, resume_command: str, report: Optional[Callable[[dict], None]] = None) -> int:
    """Run ``job``; 0 when done (after ``report(metrics)`` on the rank that has them), 130 after Ctrl-C
    (with ``resume with: <resume_command>`` when there is something to resume); the job's user errors
    (``job.user_errors``) and a failed collective become a CommandError."""
    try:
        metrics = job.run()
    except job.interrupted as e:
        print(f"\n{e}", file=sys.stderr)
        if getattr(e, "checkpoint", None) is not None or job.holds_run(job.out_dir):
            print(f"resume with: {resume_command}", file=sys.stderr)
        return 130
    except (*job.user_errors, DistributedError) as e:
        raise CommandError(str(e)) from None
    if report is not None and metrics is not None:  # None: a rank other than 0 of a torchrun job
        report(metrics)
    return 0


def reports_errors(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """A command's handler whose CommandError is printed as ``metafast <command>: error: ...`` (exit 2)."""
    @functools.wraps(handler)
    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except CommandError as e:
            print(f"metafast {args.command}: error: {e}", file=sys.stderr)
            return 2
    return run
