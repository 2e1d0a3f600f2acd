"""The ``metafast`` command: train / eval / multitask / distill / bench (metafast.commands, one module
each) and info (here: versions and the backend report).

``metafast train`` with no arguments meta-trains MAML on sinusoid regression (the default job).
"""
import argparse
import importlib
import platform
import sys
from typing import Dict, List, Optional

from metafast.commands import COMMANDS

PROG = "metafast"


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


# ----------------------------------------------------------------------------- entry point
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Meta-learning for PyTorch on fused GPU kernels.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:  # each command's options and handler live in its module of metafast.commands
        command.add_parser(sub)
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
        return args.handler(args)  # a command's user errors: printed by the command, exit status 2
    except KeyboardInterrupt:  # outside the training loop's own handling (start-up, benchmarks)
        print(f"\n{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
