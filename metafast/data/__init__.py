"""Task families and few-shot data."""
from .cifar import CIFARFS, FC100
from .episodes import Episodes, EpisodeSampler, ImageSplit
from .folder import FolderDataset
from .miniimagenet import MiniImageNet
from .omniglot import Omniglot
from .sinusoid import SinusoidBatch, SinusoidTasks
from .splits import DatasetCorruptError, DatasetNotFoundError, load_split

__all__ = ["SinusoidBatch", "SinusoidTasks", "Omniglot", "MiniImageNet", "CIFARFS", "FC100", "FolderDataset", "Episodes",
           "EpisodeSampler", "ImageSplit", "load_split", "DatasetNotFoundError", "DatasetCorruptError"]
