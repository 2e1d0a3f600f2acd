"""``metafast distill``: the default distillation job (synthetic data generated in code, CPU in
seconds; metafast.jobs.distill). Prints and writes to ``--out``/metrics.json the held-out accuracy of
the teacher, of a student trained from scratch on the labels, and of the same student distilled from
the teacher."""
import argparse
import os

from ..jobs.distill import DistillConfig, DistillJob, format_results
from ..runtime.command import add_run_arguments, given_options, job_config, reports_errors, run_job

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
    defaults = DistillConfig()
    p = subparsers.add_parser(
        "distill", help="knowledge distillation (teacher -> student) on a synthetic task",
        description="Train a teacher MLP, a small student from scratch, and the same student distilled from the "
                    "teacher with kd_loss; report their held-out accuracy and write metrics.json.")
    for opt, (field, typ, text) in _FIELDS.items():
        p.add_argument(opt, type=typ, default=None, help=f"{text} (default {getattr(defaults, field)})")
    add_run_arguments(p, prefix="distill-", resume_help="finish the interrupted run in DIR exactly")
    p.set_defaults(handler=main)
    return p


@reports_errors
def main(args: argparse.Namespace) -> int:
    given = given_options(args, [field for field, _, _ in _FIELDS.values()])
    config, out_dir = job_config(args, DistillJob, given, prefix="distill-")

    def report(metrics: dict) -> None:
        print(format_results(metrics))
        print(f"metrics written to {os.path.join(out_dir, 'metrics.json')}")

    job = DistillJob(config, out_dir, resume=bool(args.resume), progress=not args.no_progress)
    return run_job(job, f"metafast distill --resume {out_dir}", report)
