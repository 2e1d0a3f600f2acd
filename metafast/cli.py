"""The ``metafast`` command: train / eval / distill / multitask / bench / info.

``metafast train`` with no arguments meta-trains MAML on sinusoid regression (the default job).
"""
import argparse
import dataclasses
import importlib
import os
import platform
import sys
import traceback
from pathlib import Path
from typing import Dict, List, Optional

from metafast.distill import command as distill_command
from metafast.multitask import command as multitask_command
from metafast.train import vision
from metafast.train.arguments import int_at_least as _int_at_least, positive_float as _positive_float
from metafast.train.run import new_run_dir

PROG = "metafast"


class CommandError(Exception):
    """A user-facing error: printed as ``metafast <command>: error: <message>``, exit status 2."""


# ----------------------------------------------------------------------------- argument types
# ----------------------------------------------------------------------------- train
# Options that map onto SinusoidConfig fields; None means "not given" (defaults, or the checkpoint's).
_TRAIN_FIELDS = ("iterations", "meta_batch", "inner_lr", "inner_steps", "meta_lr", "first_order", "meta_sgd",
                 "seed", "device", "checkpoint_every")


def _add_train_parser(sub) -> None:
    from metafast.train.sinusoid import DEFAULT_CHECKPOINT_EVERY, DEFAULT_ITERATIONS, PAPER_ITERATIONS

    p = sub.add_parser(
        "train", help="meta-train a model (default: MAML on sinusoid regression)",
        description="Meta-train MAML. With no arguments: sinusoid regression with the MAML paper's setup "
                    "(MLP 1-40-40-1, K=10, 1 inner step lr 0.01, meta-batch 25, Adam 1e-3, second order), "
                    f"{DEFAULT_ITERATIONS} iterations (the paper uses --iterations {PAPER_ITERATIONS}).")
    p.add_argument("--dataset", choices=sorted(_TRAIN_JOBS), default="sinusoid", help="task family (default: sinusoid)")
    p.add_argument("--iterations", type=_int_at_least(1), help=f"meta-iterations (default {DEFAULT_ITERATIONS})")
    p.add_argument("--meta-batch", type=_int_at_least(1),
                   help="tasks per meta-batch (default 25); per process under torchrun, so W processes use W times as many")
    p.add_argument("--inner-lr", type=_positive_float, help="inner-loop SGD learning rate (default 0.01)")
    p.add_argument("--inner-steps", type=_int_at_least(1), help="inner-loop steps (default 1)")
    p.add_argument("--meta-lr", type=_positive_float, help="Adam learning rate of the meta-update (default 1e-3)")
    p.add_argument("--first-order", action="store_true", default=None, help="first-order MAML (default: second order)")
    p.add_argument("--meta-sgd", action="store_true", default=None, help="learn per-parameter inner learning rates")
    p.add_argument("--seed", type=_int_at_least(0), help="seed of initialisation and training tasks (default 0)")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), help="where to train (default auto)")
    p.add_argument("--checkpoint-every", type=_int_at_least(0), metavar="N",
                   help=f"save a checkpoint every N iterations, 0 = only at the end (default {DEFAULT_CHECKPOINT_EVERY})")
    p.add_argument("--out", metavar="DIR", help="output directory (default runs/<timestamp>)")
    p.add_argument("--resume", metavar="DIR", help="continue the interrupted run in DIR exactly")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--allocator", choices=("keep", "default"), default="keep",
                   help="keep: glibc keeps freed memory for reuse (no fresh pages for each step's large temporaries; "
                        "a third faster Conv4 steps on CPU); default: leave glibc's settings (default keep)")
    vision.add_train_arguments(p)  # --root, --ways, --shots, ... for the few-shot image datasets
    p.set_defaults(handler=_cmd_train)


def _train_sinusoid(args) -> int:
    from metafast.train.checkpoint import CHECKPOINT_NAME, load_checkpoint
    from metafast.train.sinusoid import SinusoidConfig, TrainingInterrupted, check_resume_config, train_sinusoid

    given = {k: getattr(args, k) for k in _TRAIN_FIELDS if getattr(args, k) is not None}
    if args.resume:
        if args.out is not None and os.path.abspath(args.out) != os.path.abspath(args.resume):
            raise CommandError("--out and --resume both given: a resumed run writes into the directory it resumes")
        try:
            state = load_checkpoint(args.resume)
        except (FileNotFoundError, ValueError) as e:
            raise CommandError(f"--resume {args.resume}: {e}") from None
        if state.get("task") != "sinusoid":
            raise CommandError(f"--resume {args.resume}: the checkpoint is of task {state.get('task')!r}, "
                               f"not {args.dataset!r}")
        saved = SinusoidConfig.from_dict(state["config"])
        config = dataclasses.replace(saved, **given)
        try:
            check_resume_config(saved, config)
        except ValueError as e:
            raise CommandError(f"--resume {args.resume}: {e}") from None
        if config.iterations < state["iteration"]:
            raise CommandError(f"--iterations {config.iterations}: the checkpoint in {args.resume} is already at "
                               f"iteration {state['iteration']}")
        out_dir = args.resume
    else:
        config = SinusoidConfig(**given)
        out_dir = args.out or new_run_dir()
    try:
        config.validate()
        train_sinusoid(config, out_dir, resume=bool(args.resume), progress=not args.no_progress)
    except TrainingInterrupted as e:
        print(f"\n{e}", file=sys.stderr)
        if e.checkpoint is not None or os.path.exists(os.path.join(e.out_dir, CHECKPOINT_NAME)):
            print(f"resume with: {PROG} train --resume {e.out_dir}", file=sys.stderr)
        return 130
    except ValueError as e:
        raise CommandError(str(e)) from None
    except RuntimeError as e:
        from metafast.distributed import DistributedError

        if not isinstance(e, DistributedError):
            raise
        raise CommandError(str(e)) from None
    return 0


_TRAIN_JOBS = {"sinusoid": _train_sinusoid, **{name: vision.main for name in vision.DATASETS}}


def _cmd_train(args) -> int:
    from metafast import distributed
    from metafast.train.allocator import keep_freed_memory

    if args.allocator == "keep":
        keep_freed_memory()

    if args.dataset != "sinusoid" and distributed.launched():  # W uncoordinated copies would share --out
        raise CommandError(f"--dataset {args.dataset}: only the sinusoid job runs data parallel under torchrun "
                           f"(WORLD_SIZE={distributed.env_world_size()}); launch it as one process")
    return _TRAIN_JOBS[args.dataset](args)


# ----------------------------------------------------------------------------- info
def _format_value(value, indent: int) -> List[str]:
    pad = "  " * indent
    if isinstance(value, dict):
        lines = []
        for k, v in value.items():
            if isinstance(v, (dict, list, tuple)) and v:
                lines.append(f"{pad}{k}:")
                lines += _format_value(v, indent + 1)
            else:
                lines.append(f"{pad}{k}: {_scalar(v)}")
        return lines
    if isinstance(value, (list, tuple)):
        lines = []
        for v in value:
            if isinstance(v, (dict, list, tuple)) and v:
                lines.append(f"{pad}-")
                lines += _format_value(v, indent + 1)
            else:
                lines.append(f"{pad}- {_scalar(v)}")
        return lines
    return [f"{pad}{_scalar(value)}"]


def _scalar(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, (dict, list, tuple)):  # empty container
        return "none"
    return str(v)


def _versions() -> dict:
    import torch

    import metafast

    out = {"metafast": getattr(metafast, "__version__", "unknown"), "python": platform.python_version(),
           "platform": platform.platform(), "torch": torch.__version__,
           "torch CUDA build": torch.version.cuda or "none (CPU-only build)"}
    for name in ("triton", "numpy"):
        try:
            out[name] = importlib.import_module(name).__version__
        except Exception as e:  # noqa: BLE001 - any failure just means "not usable"
            out[name] = f"not available ({type(e).__name__}: {e})" if not isinstance(e, ImportError) else "not installed"
    if torch.cuda.is_available():
        out["cuda devices"] = [f"{i}: {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]
    else:
        out["cuda devices"] = "none"
    return out


def _cmd_info(args) -> int:
    print("\n".join(_format_value(_versions(), 0)))
    print()
    try:
        backend = importlib.import_module("metafast._backend")
    except ImportError as e:
        if isinstance(e, ModuleNotFoundError) and e.name == "metafast._backend":
            print("backends: metafast._backend is not part of this installation; no backend report available")
            return 0
        print(f"backends: metafast._backend failed to import ({type(e).__name__}: {e})")
        return 1
    describe = getattr(backend, "describe", None)
    if describe is None:
        print("backends: metafast._backend has no describe(); no backend report available")
        return 0
    try:
        report = describe()
    except Exception as e:  # noqa: BLE001 - the versions above are still worth printing
        print(f"backends: metafast._backend.describe() failed ({type(e).__name__}: {e})")
        return 1
    print("backends:")
    print("\n".join(_format_value(report, 1)))
    print("meta-step path of BatchedMAML for stock models (float32):")
    print("\n".join(_format_value(_meta_step_paths(), 1)))
    return 0


def _meta_step_paths() -> Dict[str, Dict[str, str]]:
    """The meta-step path BatchedMAML takes for each stock model, per device, and why (the paths before it: why not)."""
    import torch

    from .algorithms.batched_maml import explain_paths
    from .models import MLP, Conv4

    models = {
        "sinusoid MLP 1-40-40-1 (mse)": (lambda: MLP(1, [40, 40], 1), "mse"),
        "Omniglot MLP 784-256-128-64-64-5": (lambda: MLP(784, [256, 128, 64, 64], 5), "cross_entropy"),
        "classifier head 64->5": (lambda: MLP(64, [], 5), "cross_entropy"),
        "Conv4 (Omniglot)": (lambda: Conv4.omniglot(5), "cross_entropy"),
    }
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    out: Dict[str, Dict[str, str]] = {}
    for name, (make, loss) in models.items():
        out[name] = {dev: explain_paths(make(), loss, dev) for dev in devices}
    return out


# ----------------------------------------------------------------------------- bench
_ROW_METADATA = ("bench", "device", "torch", "commit", "date")


def find_bench_dir() -> Optional[Path]:
    """The repository's bench/ directory (present in a source checkout, absent from a wheel install)."""
    import metafast

    candidates = [Path(metafast.__file__).resolve().parent.parent / "bench", Path.cwd() / "bench"]
    for c in candidates:
        if (c / "common.py").is_file() and (c / "__init__.py").is_file():
            return c
    return None


def _import_bench(bench_dir: Path):
    root = str(bench_dir.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    pkg = importlib.import_module("bench")
    # Another installed package called "bench" must not be mistaken for ours.
    if Path(pkg.__file__).resolve().parent != bench_dir.resolve():
        raise CommandError(f"'import bench' found {pkg.__file__}, not the repository's {bench_dir}")
    return importlib.import_module("bench.common")


def _columns(module, rows: List[dict]) -> List[str]:
    cols = getattr(module, "COLUMNS", None)
    if cols:
        return list(cols)
    seen: List[str] = []
    for r in rows:
        seen += [k for k in r if k not in seen and k not in _ROW_METADATA]
    return seen


def _cmd_bench(args) -> int:
    import torch

    bench_dir = find_bench_dir()
    if bench_dir is None:
        raise CommandError("the benchmarks live in the bench/ directory of a metafast source checkout, which this "
                           "installation does not have (e.g. installed from a wheel); run from a clone of the repository")
    common = _import_bench(bench_dir)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    elif args.device == "cuda" and not torch.cuda.is_available():
        raise CommandError("--device cuda: torch.cuda.is_available() is False")
    else:
        device = torch.device(args.device)
    stems = sorted(p.stem for p in bench_dir.glob("bench_*.py"))
    if args.only:
        stems = [s for s in stems if any(o in s for o in args.only)]
    if not stems:
        what = f" matching {args.only}" if args.only else ""
        raise CommandError(f"no bench_*.py modules{what} in {bench_dir}")
    failed = 0
    for stem in stems:
        print(f"== {stem} on {common.device_name(device)}" + (" (quick)" if args.quick else ""))
        try:
            module = importlib.import_module(f"bench.{stem}")
            run = getattr(module, "run", None)
            if run is None:
                print("   skipped: no run(device, quick=False) function\n")
                continue
            rows = run(device, quick=args.quick)
        except Exception:  # noqa: BLE001 - report and go on with the other benchmarks
            failed += 1
            print(traceback.format_exc(), file=sys.stderr)
            continue
        if rows:
            common.print_table(rows, _columns(module, rows))
        else:
            print("   (no rows)")
        print()
    if failed:
        print(f"{failed} of {len(stems)} benchmarks failed", file=sys.stderr)
        return 1
    return 0


# ----------------------------------------------------------------------------- entry point
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Meta-learning for PyTorch on fused GPU kernels.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_train_parser(sub)
    vision.add_parser(sub)  # eval CHECKPOINT
    multitask_command.add_parser(sub)
    distill_command.add_parser(sub)
    p = sub.add_parser("bench", help="run the kernel microbenchmarks of a source checkout (bench/)")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto", help="default auto")
    p.add_argument("--quick", action="store_true", help="small problem sizes, few repeats")
    p.add_argument("--only", nargs="+", metavar="NAME", help="run only benchmarks whose name contains NAME")
    p.set_defaults(handler=_cmd_bench)
    p = sub.add_parser("info", help="print versions and which backend runs each op")
    p.set_defaults(handler=_cmd_info)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2, message already printed)
        return e.code if isinstance(e.code, int) else 2
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.handler(args)
    except CommandError as e:
        print(f"{PROG} {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outside the training loop's own handling (start-up, benchmarks)
        print(f"\n{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
