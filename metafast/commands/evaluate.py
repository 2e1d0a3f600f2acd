"""``metafast eval``: accuracy of a few-shot vision checkpoint on fixed episodes (metafast.jobs.vision)."""
import argparse

from ..jobs.vision import evaluate_checkpoint
from ..runtime.arguments import int_at_least
from ..runtime.command import CommandError, reports_errors


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("eval", help="evaluate a few-shot checkpoint on the 600 fixed test episodes",
                              description="Mean accuracy +- 95%% CI of a checkpoint written by `metafast train "
                                          "--dataset ...` (any --algorithm: the MAML family adapts to each "
                                          "episode, protonet classifies by prototypes) on fixed episodes; "
                                          "writes metrics.json with the algorithm.")
    p.add_argument("checkpoint", help="best.pt, checkpoint.pt or a run directory (uses its best.pt)")
    p.add_argument("--root", metavar="DIR", help="dataset folder (default: the one used in training)")
    p.add_argument("--split", choices=("test", "val"), default="test", help="default test")
    p.add_argument("--episodes", type=int_at_least(1), help="default: the run's eval episodes (600)")
    p.add_argument("--steps", type=int_at_least(0), help="inner steps (MAML family; default: the run's test steps)")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")
    p.add_argument("--out", metavar="FILE", help="metrics file (default metrics.json beside the checkpoint)")
    p.set_defaults(handler=main)
    return p


@reports_errors
def main(args: argparse.Namespace) -> int:
    try:
        evaluate_checkpoint(args.checkpoint, root=args.root, split=args.split, episodes=args.episodes,
                            steps=args.steps, device=args.device, out=args.out)
    except (ValueError, FileNotFoundError, ImportError) as e:
        raise CommandError(str(e)) from None
    return 0
