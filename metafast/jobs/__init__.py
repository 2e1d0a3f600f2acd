"""The training jobs behind the ``metafast`` commands, one module each, all built on the job skeleton
of metafast.runtime.job (start/resume checks, atomic checkpoints, Ctrl-C, progress, metrics):

- sinusoid   the default job: MAML on sinusoid regression (``metafast train``)
- vision     few-shot image classification (``metafast train --dataset ...``, ``metafast eval``)
- distill    teacher -> student knowledge distillation on synthetic data (``metafast distill``)
- multitask  loss weighting strategies on related synthetic tasks (``metafast multitask``)
"""
