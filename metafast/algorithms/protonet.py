"""Prototypical networks (Snell et al. 2017) for T episodes in one batched pass.

One embedding forward runs over the support and query images of all T episodes together; the class
prototypes are segment means (one bmm with the one-hot support labels, so uneven shots work too) and
the logits one batched distance:

  euclidean  logits = -||q - p||^2 = 2 q.p - ||q||^2 - ||p||^2   (one baddbmm; Snell et al.'s squared
             euclidean distance, no scale)
  cosine     logits = s * <q/|q|, p/|p|>   (p: the mean of the raw support embeddings, normalised
             afterwards as learn2learn's PrototypicalClassifier does; s a learnable scale, 10 at
             start, or fixed with ``learn_scale=False``)

BatchNorm in the embedding (``batchnorm=``):
  "episode" (default): in training mode, or without running statistics, every episode is normalised
      with the statistics of its own support + query images, exactly as a per-episode loop that embeds
      each episode's images in one forward (learn2learn's ProtoNet examples) does. The images travel
      episode-minor ([N, T, ...] flattened), so per-episode statistics are one batch_norm over T*C
      channels of a free view. Running statistics (if tracked) are updated once per call with the mean
      of the per-episode means and unbiased variances.
  "batch": the embedding runs as given: training-mode statistics span all T episodes' images.
  With running statistics in eval mode both are the per-image normalisation of the embedding.

The labels of an episode are 0..ways-1; every class needs at least one support sample.
``train_step`` is one optimisation step on an episode batch (``metafast.data.episodes.Episodes`` or
anything with support_x/support_y/query_x/query_y); ``evaluate`` gives the mean accuracy and its 95%
CI over an ``EpisodeSampler``'s 600 fixed evaluation episodes (or any iterable of batches); the CI is
1.96 std / sqrt(n), as metafast/train/vision.py's ``evaluate`` computes it. Nothing here depends on the
number of ways or shots, so training and test settings may differ.
"""
import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import cpu_cache
from ..functional.modes import eval_mode

__all__ = ["ProtoNet", "ProtoOutput", "DISTANCES", "BATCHNORM_MODES", "class_prototypes", "euclidean_logits",
           "cosine_logits", "reference_logits", "train_step", "evaluate", "mean_ci95"]

DISTANCES = ("euclidean", "cosine")
BATCHNORM_MODES = ("episode", "batch")
_PLAIN_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
EVAL_EPISODES = 600  # the few-shot literature's evaluation set size (as metafast.data.episodes)
EVAL_BATCH = 50      # episodes per evaluation pass (memory, not results)


@dataclass
class ProtoOutput:
    loss: Tensor            # mean over episodes of the mean query cross-entropy (differentiable)
    episode_losses: Tensor  # [T], detached
    accuracies: Tensor      # [T] query accuracy per episode, detached
    logits: Tensor          # [T, Q, ways] (differentiable)
    prototypes: Tensor      # [T, ways, D] (differentiable)


# -- the batched math ------------------------------------------------------------------------------
def class_prototypes(support: Tensor, support_y: Tensor, ways: int) -> Tensor:
    """Segment means: support [T, S, D], labels [T, S] in [0, ways) -> [T, ways, D]. Every class must
    have a sample (checked by ProtoNet; here an empty class gives inf/nan)."""
    onehot = F.one_hot(support_y, ways).to(support.dtype)  # [T, S, W]
    counts = onehot.sum(1)                                   # [T, W]
    return torch.bmm(onehot.transpose(1, 2), support) / counts.unsqueeze(-1)


def euclidean_logits(query: Tensor, prototypes: Tensor) -> Tensor:
    """-||q - p||^2 for query [T, Q, D] and prototypes [T, W, D] -> [T, Q, W], as one baddbmm."""
    q2 = (query * query).sum(-1)            # [T, Q]
    p2 = (prototypes * prototypes).sum(-1)  # [T, W]
    return torch.baddbmm(-(q2.unsqueeze(2) + p2.unsqueeze(1)), query, prototypes.transpose(1, 2), alpha=2.0)


def cosine_logits(query: Tensor, prototypes: Tensor, scale: Tensor) -> Tensor:
    """scale * cos(q, p) for query [T, Q, D] and prototypes [T, W, D] -> [T, Q, W]."""
    q = F.normalize(query, dim=-1)
    p = F.normalize(prototypes, dim=-1)
    return torch.bmm(q, p.transpose(1, 2)) * scale


def reference_logits(embedding: nn.Module, support_x: Tensor, support_y: Tensor, query_x: Tensor, ways: int,
                     distance: str = "euclidean", scale=None) -> Tuple[Tensor, Tensor]:
    """The per-episode oracle: for each episode, embed its support + query images in one forward,
    average each class's support embeddings, and take the distance elementwise. Returns (logits
    [T, Q, ways], prototypes [T, ways, D])."""
    logits, protos = [], []
    S = support_x.shape[1]
    for t in range(support_x.shape[0]):
        e = embedding(torch.cat([support_x[t], query_x[t]])).flatten(1)
        s, q = e[:S], e[S:]
        p = torch.stack([s[support_y[t] == c].mean(0) for c in range(ways)])
        if distance == "euclidean":
            logits.append(-((q.unsqueeze(1) - p.unsqueeze(0)) ** 2).sum(-1))
        else:
            qn = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            pn = p / p.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            logits.append((qn.unsqueeze(1) * pn.unsqueeze(0)).sum(-1) * scale)
        protos.append(p)
    return torch.stack(logits), torch.stack(protos)


# -- per-episode BatchNorm ------------------------------------------------------------------------
def _episode_batch_norm(m: nn.modules.batchnorm._BatchNorm, episodes: int, x: Tensor) -> Tensor:
    """``m``'s forward with per-episode statistics for an episode-minor batch (sample i of episode t
    at row i * episodes + t): a view [N, T*C, ...] makes them per-channel statistics."""
    if not m.training and m.running_mean is not None:
        return type(m).forward(m, x)  # running statistics: per-image, layout-agnostic
    n, C = x.shape[0], x.shape[1]
    if n % episodes:
        raise RuntimeError(f"batchnorm='episode': {type(m).__name__} got a batch of {n} rows, not a multiple of "
                           f"the {episodes} episodes (does the embedding reshape its batch?); use "
                           "batchnorm='batch'")
    xg = x.reshape(n // episodes, episodes * C, *x.shape[2:])
    w = None if m.weight is None else m.weight.repeat(episodes)
    b = None if m.bias is None else m.bias.repeat(episodes)
    y = F.batch_norm(xg, None, None, w, b, True, 0.0, m.eps).view_as(x)
    if m.training and m.track_running_stats and m.running_mean is not None:
        with torch.no_grad():
            dims = [0] + list(range(2, xg.dim()))
            mean = xg.mean(dims).view(episodes, C).mean(0)
            var = xg.var(dims, unbiased=True).view(episodes, C).mean(0)
            m.num_batches_tracked.add_(1)
            f = 1.0 / float(m.num_batches_tracked) if m.momentum is None else m.momentum
            m.running_mean.mul_(1 - f).add_(mean.to(m.running_mean.dtype), alpha=f)
            m.running_var.mul_(1 - f).add_(var.to(m.running_var.dtype), alpha=f)
    return y


@contextlib.contextmanager
def _per_episode_batchnorm(module: nn.Module, episodes: int):
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        if type(m) not in _PLAIN_BN:
            raise ValueError(f"batchnorm='episode': {type(m).__name__} is not supported (BatchNorm1d/2d/3d are); "
                             "use batchnorm='batch'")
    saved = [m.__dict__.get("forward") for m in bns]
    try:
        for m in bns:
            m.forward = functools.partial(_episode_batch_norm, m, episodes)
        yield
    finally:
        for m, f in zip(bns, saved):
            if f is None:
                del m.forward
            else:
                m.forward = f


# -- input checks ----------------------------------------------------------------------------------
def _check_images(name: str, x) -> None:
    if not torch.is_tensor(x) or x.dim() < 3 or not x.dtype.is_floating_point:
        got = f"{x.dtype} {tuple(x.shape)}" if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f"{name}: expected a floating tensor [T, N, *features] (T episodes, N samples each), "
                         f"got {got}")


def _check_labels(name: str, y, shape) -> None:
    if not torch.is_tensor(y) or y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        got = y.dtype if torch.is_tensor(y) else type(y).__name__
        raise ValueError(f"{name}: expected an integer tensor {list(shape)}, got {got}")
    if tuple(y.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {list(shape)} (the first two dims of the images), "
                         f"got {list(y.shape)}")


def _check_batch(support_x, support_y, query_x, query_y, ways) -> int:
    """Validates an episode batch; returns the number of ways."""
    _check_images("support_x", support_x)
    _check_images("query_x", query_x)
    T, S = support_x.shape[:2]
    if T < 1 or S < 1:
        raise ValueError(f"support_x: expected at least one episode and one support sample, got {list(support_x.shape)}")
    if query_x.shape[0] != T:
        raise ValueError(f"query_x: expected {T} episodes (as support_x), got {query_x.shape[0]}")
    if query_x.shape[1] < 1:
        raise ValueError(f"query_x: expected at least one query sample per episode, got {list(query_x.shape)}")
    if query_x.shape[2:] != support_x.shape[2:]:
        raise ValueError(f"query_x: expected samples of shape {list(support_x.shape[2:])} (as support_x), "
                         f"got {list(query_x.shape[2:])}")
    if query_x.dtype != support_x.dtype or query_x.device != support_x.device:
        raise ValueError(f"query_x: expected {support_x.dtype} on {support_x.device} (as support_x), "
                         f"got {query_x.dtype} on {query_x.device}")
    _check_labels("support_y", support_y, support_x.shape[:2])
    if query_y is not None:
        _check_labels("query_y", query_y, query_x.shape[:2])
    lo, hi = int(support_y.min()), int(support_y.max())
    if ways is None:
        ways = hi + 1
    elif isinstance(ways, bool) or not isinstance(ways, int) or ways < 1:
        raise ValueError(f"ways: expected an int >= 1, got {ways!r}")
    if lo < 0 or hi >= ways:
        raise ValueError(f"support_y: expected labels in [0, {ways}) (0..ways-1 per episode), got [{lo}, {hi}]")
    if query_y is not None:
        qlo, qhi = int(query_y.min()), int(query_y.max())
        if qlo < 0 or qhi >= ways:
            raise ValueError(f"query_y: expected labels in [0, {ways}) (the support's classes), got [{qlo}, {qhi}]")
    counts = F.one_hot(support_y.long(), ways).sum(1)  # [T, W]
    empty = (counts == 0).nonzero()
    if empty.numel():
        t, c = empty[0].tolist()
        raise ValueError(f"support_y: episode {t} has no support sample of class {c} "
                         f"({empty.shape[0]} empty (episode, class) pairs); every class 0..{ways - 1} needs one")
    return ways


# -- the module ------------------------------------------------------------------------------------
class ProtoNet(nn.Module):
    """Prototypical networks over T episodes at once.

    Args:
        embedding: a module mapping [B, *features] to [B, ...] (flattened to [B, D]).
        distance: "euclidean" (negative squared euclidean distance, Snell et al.) or "cosine".
        scale: cosine only: the logit scale (default 10.0).
        learn_scale: cosine only: learn the scale (default) or keep it fixed.
        batchnorm: "episode" (per-episode statistics, the default) or "batch" (see the module doc).
    """

    def __init__(self, embedding: nn.Module, distance: str = "euclidean", scale: Optional[float] = None,
                 learn_scale: bool = True, batchnorm: str = "episode"):
        super().__init__()
        if not isinstance(embedding, nn.Module):
            raise TypeError(f"embedding: expected an nn.Module, got {type(embedding).__name__}")
        if distance not in DISTANCES:
            raise ValueError(f"distance: expected one of {DISTANCES}, got {distance!r}")
        if batchnorm not in BATCHNORM_MODES:
            raise ValueError(f"batchnorm: expected one of {BATCHNORM_MODES}, got {batchnorm!r}")
        self.embedding = embedding
        self.distance = distance
        self.batchnorm = batchnorm
        if distance == "euclidean":
            if scale is not None:
                raise ValueError("scale: only the cosine distance has a scale (the euclidean logits are "
                                 f"-||q - p||^2), got scale={scale!r}")
            self.scale = None
        else:
            scale = 10.0 if scale is None else scale
            if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
                raise ValueError(f"scale: expected a finite number > 0, got {scale!r}")
            value = torch.tensor(float(scale))
            if learn_scale:
                self.scale = nn.Parameter(value)
            else:
                self.register_buffer("scale", value)

    def extra_repr(self) -> str:
        return f"distance={self.distance!r}, batchnorm={self.batchnorm!r}"

    def embed(self, support_x: Tensor, query_x: Tensor) -> Tuple[Tensor, Tensor]:
        """One embedding forward over all episodes' support and query samples: ([T, S, D], [T, Q, D])."""
        T, S = support_x.shape[:2]
        # episode-minor rows (sample-major): per-episode BatchNorm statistics are then a free view
        x = torch.cat([support_x.transpose(0, 1), query_x.transpose(0, 1)]).flatten(0, 1)
        ctx = _per_episode_batchnorm(self.embedding, T) if self.batchnorm == "episode" else contextlib.nullcontext()
        with ctx:
            e = self.embedding(x)
        if e.dim() < 2 or e.shape[0] != x.shape[0]:
            raise RuntimeError(f"embedding: expected an output [{x.shape[0]}, ...] (one row per input sample), "
                               f"got {list(e.shape)}")
        e = e.reshape(e.shape[0] // T, T, -1)
        return e[:S].transpose(0, 1), e[S:].transpose(0, 1)

    def logits(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, ways: Optional[int] = None,
               query_y: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """(logits [T, Q, ways], prototypes [T, ways, D]) of T episodes."""
        ways = _check_batch(support_x, support_y, query_x, query_y, ways)
        support, query = self.embed(support_x, query_x)
        protos = class_prototypes(support, support_y.long(), ways)
        if self.distance == "euclidean":
            return euclidean_logits(query, protos), protos
        return cosine_logits(query, protos, self.scale), protos

    def forward(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor,
                ways: Optional[int] = None) -> ProtoOutput:
        if query_y is None:
            raise ValueError("query_y: expected the query labels [T, Q]; use logits()/predict() without them")
        logits, protos = self.logits(support_x, support_y, query_x, ways, query_y)
        T, Q, W = logits.shape
        y = query_y.long()
        per_query = F.cross_entropy(logits.reshape(T * Q, W), y.reshape(-1), reduction="none").view(T, Q)
        episode_losses = per_query.mean(1)
        with torch.no_grad():
            acc = (logits.argmax(-1) == y).to(logits.dtype).mean(1)
        return ProtoOutput(episode_losses.mean(), episode_losses.detach(), acc, logits, protos)

    @torch.no_grad()
    def predict(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, ways: Optional[int] = None) -> Tensor:
        """Query logits [T, Q, ways] without gradients (the module's current train/eval mode)."""
        return self.logits(support_x, support_y, query_x, ways)[0]

    def evaluate(self, episodes, ways: Optional[int] = None, count: int = EVAL_EPISODES, batch: int = EVAL_BATCH) -> dict:
        """Accuracy and its 95% CI over an EpisodeSampler's fixed ``count`` (600) episodes, or over an
        iterable of episode batches, in eval mode: see :func:`evaluate`."""
        return evaluate(self, episodes, ways, count, batch)


# -- training and evaluation helpers ---------------------------------------------------------------
def train_step(protonet: ProtoNet, optimizer: torch.optim.Optimizer, batch) -> ProtoOutput:
    """One optimisation step on an episode batch (fields support_x, support_y, query_x, query_y).

    Forward and backward run in one ``cpu_cache.scope``: the batched pass's maps are large (Omniglot
    Conv4, 32 episodes of 20-way 5-shot 5-query: 320 MB per first-block map), glibc maps such blocks
    fresh on every allocation, and faulting their pages in again each step took 30-50% of the step
    on 2 CPU cores (bench/NOTES.md)."""
    protonet.train()
    with cpu_cache.scope(batch.support_x.device):
        out = protonet(batch.support_x, batch.support_y, batch.query_x, batch.query_y)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
    return out


def mean_ci95(values: Tensor) -> Tuple[float, float]:
    """(mean, 95% CI half-width 1.96 std / sqrt(n)) of a 1-d tensor; nan half-width for n < 2."""
    values = values.to(torch.float64)
    ci = 1.96 * values.std().item() / math.sqrt(values.numel()) if values.numel() > 1 else float("nan")
    return values.mean().item(), ci


def evaluate(protonet: ProtoNet, episodes, ways: Optional[int] = None, count: int = EVAL_EPISODES,
             batch: int = EVAL_BATCH) -> dict:
    """Mean query accuracy over a set of episodes in eval mode (restored afterwards), its 95% CI
    half-width and the per-episode accuracies: the keys accuracy, ci95, episodes, per_episode (as the
    vision job's evaluation reports).

    ``episodes``: an ``EpisodeSampler`` (its fixed evaluation set of ``count`` episodes, 600 by
    default, in batches of ``batch``) or any iterable of batches with support_x/support_y/query_x/query_y."""
    if hasattr(episodes, "fixed_episodes"):
        episodes = episodes.fixed_episodes(count=count, batch=batch)
    accs = []
    with eval_mode(protonet), torch.no_grad():
        for batch in episodes:
            with cpu_cache.scope(batch.support_x.device):
                logits = protonet.logits(batch.support_x, batch.support_y, batch.query_x, ways, batch.query_y)[0]
            accs.append((logits.argmax(-1) == batch.query_y).to(torch.float64).mean(1).cpu())
    if not accs:
        raise ValueError("episodes: expected at least one episode batch, got none")
    accs = torch.cat(accs)
    mean, ci = mean_ci95(accs)
    return {"accuracy": mean, "ci95": ci, "episodes": accs.numel(), "per_episode": accs.tolist()}
