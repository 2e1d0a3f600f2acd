"""N-way K-shot episodes over an in-memory image dataset, a whole meta-batch per call.

A split of a few-shot dataset is one uint8 tensor of images [N, C, H, W] plus int64 class ids [N]
(``ImageSplit``). ``EpisodeSampler`` draws T tasks at once: ``ways`` distinct classes per task and
``shots + queries`` distinct images per class, labels remapped to 0..ways-1 within each task, and
returns [T, ways*shots, C, H, W] / [T, ways*queries, C, H, W] float tensors with int64 labels - the
batch layout BatchedMAML consumes. The images can live on the GPU: an episode is then one
index_select there (no DataLoader, no host-to-device copy of pixels).

Indices are drawn on the CPU from a seeded ``torch.Generator``, so a seed gives the same episodes on
any device. ``fixed_episodes`` gives the evaluation set: ``count`` episodes (600 by default) from a
seed of their own, identical whatever the batch size they are consumed in.
"""
from typing import Iterator, List, NamedTuple, Optional, Sequence

import torch

EVAL_EPISODES = 600
EVAL_SEED = 20170703  # independent of any training seed, so evaluations compare across runs


class Episodes(NamedTuple):
    support_x: torch.Tensor  # [T, ways*shots, C, H, W] float
    support_y: torch.Tensor  # [T, ways*shots] int64 in [0, ways)
    query_x: torch.Tensor    # [T, ways*queries, C, H, W] float
    query_y: torch.Tensor    # [T, ways*queries] int64 in [0, ways)
    classes: torch.Tensor    # [T, ways] int64: the split's class id behind task label j


class ImageSplit:
    """One split of an image dataset held in memory.

    images: uint8 [N, C, H, W]; labels: int64 [N] in [0, len(class_names)); class_names: what each
    class id stands for (e.g. 'n01532829' or 'images_background/Latin/character01/rot090').
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str], name: str = "dataset"):
        if not torch.is_tensor(images) or images.dim() != 4 or images.dtype != torch.uint8:
            got = f"{images.dtype} {tuple(images.shape)}" if torch.is_tensor(images) else type(images).__name__
            raise ValueError(f"images: expected a uint8 tensor [N, C, H, W], got {got}")
        if not torch.is_tensor(labels) or labels.dim() != 1 or labels.shape[0] != images.shape[0]:
            got = tuple(labels.shape) if torch.is_tensor(labels) else type(labels).__name__
            raise ValueError(f"labels: expected a tensor [{images.shape[0]}] (one per image), got {got}")
        labels = labels.to(torch.int64)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= len(class_names)):
            raise ValueError(f"labels: expected class ids in [0, {len(class_names)}), got "
                             f"[{int(labels.min())}, {int(labels.max())}]")
        self.images = images
        self.labels = labels
        self.class_names = list(class_names)
        self.name = name

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self):
        return tuple(self.images.shape[1:])

    def __len__(self) -> int:
        return self.images.shape[0]

    def counts(self) -> torch.Tensor:
        return torch.bincount(self.labels.cpu(), minlength=self.num_classes)

    def __repr__(self) -> str:
        return f"ImageSplit({self.name}: {len(self)} images {list(self.image_shape)}, {self.num_classes} classes)"


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return value


class EpisodeSampler:
    """Meta-batches of N-way K-shot episodes from an ``ImageSplit``.

    Args:
        split: the images.
        ways, shots, queries: classes per task, support and query images per class.
        device: where episodes are assembled and returned; the images are copied there once.
        dtype: floating dtype of the returned images (pixels scaled to [0, 1], then normalised).
        mean, std: optional per-channel normalisation (sequences of C floats).
        seed: seed of the episode generator (``sample``); ``fixed_episodes`` uses its own.
    """

    def __init__(self, split: ImageSplit, ways: int, shots: int, queries: int, device=None,
                 dtype: torch.dtype = torch.float32, mean: Optional[Sequence[float]] = None,
                 std: Optional[Sequence[float]] = None, seed: int = 0):
        if not isinstance(split, ImageSplit):
            raise TypeError(f"split: expected an ImageSplit, got {type(split).__name__}")
        self.ways = _check_int("ways", ways, 1)
        self.shots = _check_int("shots", shots, 1)
        self.queries = _check_int("queries", queries, 0)
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype: expected a floating-point torch.dtype, got {dtype!r}")
        if split.num_classes < ways:
            raise ValueError(f"ways: {split.name} has {split.num_classes} classes, cannot draw {ways}-way tasks")
        counts = split.counts()
        need = shots + queries
        if int(counts.min()) < need:
            c = int(counts.argmin())
            raise ValueError(f"shots + queries: {split.name} class {split.class_names[c]!r} has {int(counts[c])} "
                             f"images, fewer than shots + queries = {need}")
        self.split = split
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else split.images.device
        self.images = split.images.to(self.device)
        # members[c, :counts[c]]: the image indices of class c (CPU; padded with -1)
        order = torch.argsort(split.labels.cpu(), stable=True)
        self.counts = counts
        self.members = torch.full((split.num_classes, int(counts.max())), -1, dtype=torch.int64)
        starts = torch.cumsum(counts, 0) - counts
        for c in range(split.num_classes):
            self.members[c, :counts[c]] = order[starts[c]:starts[c] + counts[c]]
        C = split.image_shape[0]
        self.scale = self._channel_param(mean, C, 0.0, "mean"), self._channel_param(std, C, 1.0, "std")
        self.generator = torch.Generator().manual_seed(int(seed))

    def _channel_param(self, value, C: int, default: float, name: str) -> torch.Tensor:
        if value is None:
            value = [default] * C
        value = [float(v) for v in value]
        if len(value) != C:
            raise ValueError(f"{name}: expected {C} values (one per channel), got {len(value)}")
        if name == "std" and any(v <= 0 for v in value):
            raise ValueError(f"std: expected values > 0, got {value}")
        return torch.tensor(value, dtype=self.dtype, device=self.device).view(1, 1, C, 1, 1)

    # -- index drawing (CPU, seeded) -------------------------------------------------------------
    def draw_indices(self, num_tasks: int, generator: torch.Generator):
        """(image indices [T, ways, shots+queries], class ids [T, ways]) on the CPU."""
        _check_int("num_tasks", num_tasks, 1)
        T, n = num_tasks, self.shots + self.queries
        # ways distinct classes per task: the classes with the `ways` largest of i.i.d. uniform keys
        # (a uniformly random subset, in random order; topk is O(classes), a full argsort is not)
        classes = torch.rand(T, self.split.num_classes, generator=generator).topk(self.ways, dim=1).indices
        # n distinct members per chosen class the same way; padding slots get key -1, never picked
        counts = self.counts[classes]  # [T, ways]
        width = self.members.shape[1]
        keys = torch.rand(T, self.ways, width, generator=generator)
        keys.masked_fill_(torch.arange(width) >= counts.unsqueeze(-1), -1.0)
        pick = keys.topk(n, dim=-1).indices
        idx = torch.gather(self.members[classes], 2, pick)
        return idx, classes

    # -- assembly (on self.device) ---------------------------------------------------------------
    def assemble(self, idx: torch.Tensor, classes: torch.Tensor) -> Episodes:
        T, W, _ = idx.shape
        K, Q = self.shots, self.queries
        idx = idx.to(self.device, non_blocking=True)
        support = idx[:, :, :K].reshape(-1)
        query = idx[:, :, K:].reshape(-1)
        shape = self.images.shape[1:]
        mean, std = self.scale

        def pixels(flat, per_task):
            x = self.images.index_select(0, flat).view(T, per_task, *shape).to(self.dtype)
            return (x.mul_(1.0 / 255.0) - mean) / std

        labels = torch.arange(W, device=self.device)
        return Episodes(pixels(support, W * K), labels.repeat_interleave(K).expand(T, -1).contiguous(),
                        pixels(query, W * Q), labels.repeat_interleave(Q).expand(T, -1).contiguous(),
                        classes.to(self.device))

    def sample(self, num_tasks: int) -> Episodes:
        """One meta-batch of ``num_tasks`` fresh episodes from the sampler's generator."""
        return self.assemble(*self.draw_indices(num_tasks, self.generator))

    def fixed_episodes(self, count: int = EVAL_EPISODES, batch: int = 100, seed: int = EVAL_SEED) -> Iterator[Episodes]:
        """The fixed evaluation set: ``count`` episodes drawn once from ``seed`` and yielded in
        meta-batches of at most ``batch``; the episodes do not depend on ``batch``."""
        _check_int("count", count, 1)
        _check_int("batch", batch, 1)
        idx, classes = self.draw_indices(count, torch.Generator().manual_seed(int(seed)))
        for s in range(0, count, batch):
            yield self.assemble(idx[s:s + batch], classes[s:s + batch])

    # -- checkpointing ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def class_overlap(a: Sequence[str], b: Sequence[str]) -> List[str]:
    """Class names present in both lists (a correct benchmark split has none)."""
    return sorted(set(a) & set(b))
