"""``metafast distill``: the default distillation job (synthetic data generated in code, CPU in
seconds). Prints and writes to ``--out``/metrics.json the held-out accuracy of the teacher, of a
student trained from scratch on the labels, and of the same student distilled from the teacher."""
import argparse
import os
import sys
from ..train.run import new_run_dir

PROG = "metafast distill"

_FIELDS = {  # option -> (DistillConfig field, type, help)
    "--seed": ("seed", int, "seed of data, initialisation and batches"),
    "--train-size": ("train_size", int, "labelled training examples"),
    "--transfer-size": ("transfer_size", int, "unlabelled transfer inputs for distillation (0: none)"),
    "--test-size": ("test_size", int, "held-out examples"),
    "--teacher-steps": ("teacher_steps", int, "optimizer steps of the teacher"),
    "--student-steps": ("student_steps", int, "optimizer steps of each student"),
    "--batch-size": ("batch_size", int, "mini-batch size"),
    "--lr": ("lr", float, "Adam learning rate"),
    "--temperature": ("temperature", float, "softmax temperature T of the KD term"),
    "--alpha": ("alpha", float, "weight of the KD term (1 - alpha: cross-entropy on labels)"),
    "--checkpoint-every": ("checkpoint_every", int, "checkpoint every N steps, 0 = end of each phase only"),
}


def add_parser(subparsers) -> argparse.ArgumentParser:
    from .job import DistillConfig

    defaults = DistillConfig()
    p = subparsers.add_parser(
        "distill", help="knowledge distillation (teacher -> student) on a synthetic task",
        description="Train a teacher MLP, a small student from scratch, and the same student distilled from the "
                    "teacher with kd_loss; report their held-out accuracy and write metrics.json.")
    for opt, (field, typ, text) in _FIELDS.items():
        p.add_argument(opt, type=typ, default=None, help=f"{text} (default {getattr(defaults, field)})")
    p.add_argument("--out", metavar="DIR", help="output directory (default runs/distill-<timestamp>)")
    p.add_argument("--resume", metavar="DIR", help="finish the interrupted run in DIR exactly")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(handler=main)
    return p


def _error(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def main(args) -> int:
    import json

    from .distiller import DistillInterrupted
    from .job import CONFIG_NAME, METRICS_NAME, DistillConfig, format_results, run_distill_job

    given = {field: getattr(args, field) for field, _, _ in _FIELDS.values() if getattr(args, field, None) is not None}
    if args.resume:
        if args.out is not None and os.path.abspath(args.out) != os.path.abspath(args.resume):
            return _error("--out and --resume both given: a resumed run writes into the directory it resumes")
        try:
            with open(os.path.join(args.resume, CONFIG_NAME)) as f:
                config = DistillConfig.from_dict(json.load(f))
        except (OSError, ValueError) as e:
            return _error(f"--resume {args.resume}: no readable {CONFIG_NAME} ({e})")
        changed = [k for k, v in given.items() if getattr(config, k) != v]
        if changed:
            return _error(f"--resume {args.resume}: a resumed run keeps its settings; cannot change {', '.join(changed)}")
        out_dir = args.resume
    else:
        config = DistillConfig(**given)
        out_dir = args.out or new_run_dir("distill-")
    try:
        config.validate()
        metrics = run_distill_job(config, out_dir, resume=bool(args.resume), progress=not args.no_progress)
    except DistillInterrupted as e:
        print(f"\n{e}", file=sys.stderr)
        print(f"resume with: metafast distill --resume {out_dir}", file=sys.stderr)
        return 130
    except ValueError as e:
        return _error(str(e))
    if metrics is None:  # a rank other than 0 of a torchrun job: rank 0 reports
        return 0
    print(format_results(metrics))
    print(f"metrics written to {os.path.join(out_dir, METRICS_NAME)}")
    return 0


if __name__ == "__main__":  # python -m metafast.distill.command
    parser = argparse.ArgumentParser(prog="metafast")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    ns = parser.parse_args()
    sys.exit(ns.handler(ns))
