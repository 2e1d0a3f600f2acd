"""Run infrastructure shared by every job and command:

- checkpoint   atomic files (temp file + fsync + rename), torch checkpoints that load weights-only
- interrupt    Ctrl-C deferred to the next step boundary
- progress     the progress bar and the running (averaged) loss
- rng          the random state a checkpoint captures and a resume restores
- run          the device choice, TrainingInterrupted, run directories, the resume check of fixed fields
- config       JobConfig: the jobs' config base (checks, round trip through a checkpoint)
- metrics      metrics.json and the description of the machine
- job          Job: the skeleton of every training job (start/resume, loop, checkpoints, Ctrl-C)
- arguments    argparse value types; command: what every training command does around its job
- allocator    glibc's allocator setting for a training process
"""
from .checkpoint import CHECKPOINT_NAME, atomic_write, load_checkpoint, save_checkpoint, write_json
from .config import JobConfig
from .interrupt import DeferredInterrupt
from .job import Job
from .metrics import METRICS_NAME, write_metrics
from .progress import RunningLoss, progress_bar
from .run import TrainingInterrupted, new_run_dir, resolve_device

__all__ = ["CHECKPOINT_NAME", "METRICS_NAME", "atomic_write", "load_checkpoint", "save_checkpoint", "write_json",
           "JobConfig", "DeferredInterrupt", "Job", "write_metrics", "RunningLoss", "progress_bar",
           "TrainingInterrupted", "new_run_dir", "resolve_device"]
