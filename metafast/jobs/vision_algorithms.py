"""The meta-learners of the few-shot vision job (`metafast train --algorithm ...`): which options each
takes, how it is built on the job's network, one training step and one evaluation entry point.

  maml      second-order MAML (BatchedMAML)
  fomaml    first-order MAML (BatchedMAML first_order=True)
  metasgd   Meta-SGD: learned per-parameter inner rates (BatchedMAML meta_sgd=True)
  anil      ANIL: only the head is adapted in the inner loop, the body is meta-learned (BatchedMAML anil=True)
  mamlpp    MAML++ (metafast.MAMLpp; the job anneals its schedules and the meta-learning rate)
  protonet  prototypical networks (metafast.ProtoNet) on the network without its final linear layer;
            no inner loop, so the inner-loop options do not apply, and training episodes may have
            other ways/shots than the test episodes (``train_ways``/``train_shots``)

The older spelling ``first_order``/``meta_sgd`` without an algorithm still names its variant (fomaml,
metasgd); modifiers that make sense stay allowed (first-order Meta-SGD, ANIL or MAML++; ANIL with
Meta-SGD rates), contradictions are errors that say what to use instead.
"""
import math
from typing import Optional, Tuple

import torch
from torch import nn

ALGORITHMS = ("maml", "fomaml", "metasgd", "anil", "mamlpp", "protonet")
MAML_FAMILY = ALGORITHMS[:5]
# MAML++ (Antoniou et al. 2019) in iterations: the paper's schedules in epochs of 500 iterations (multi-step
# loss annealed over 15, first order for 50), and its cosine-annealed meta-learning rate down to 1e-5.
MAMLPP_SCHEDULE = dict(msl_anneal_iters=15 * 500, first_order_iters=50 * 500, min_meta_lr=1e-5)
INNER_OPTIONS = ("inner_lr", "inner_steps", "test_inner_steps")  # the inner loop's: the MAML family only
EVAL_BATCH = 50  # episodes adapted / embedded at once during evaluation (memory, not results)

# (algorithm, flag) pairs that contradict each other -> what to use instead
_CONTRADICTIONS = {
    ("maml", "first_order"): "algorithm 'maml' is second order: use algorithm 'fomaml' (--algorithm fomaml)",
    ("maml", "meta_sgd"): "use algorithm 'metasgd' (--algorithm metasgd)",
    ("fomaml", "meta_sgd"): "for first-order Meta-SGD use algorithm 'metasgd' with first_order "
                            "(--algorithm metasgd --first-order)",
    ("mamlpp", "meta_sgd"): "MAML++ learns per-step per-layer inner rates (LSLR) instead of Meta-SGD's",
    ("protonet", "first_order"): "protonet has no inner loop, so no derivative order",
    ("protonet", "meta_sgd"): "protonet has no inner loop, so no inner learning rates",
}


def algorithm_from_flags(first_order: bool, meta_sgd: bool) -> str:
    """The variant that ``first_order``/``meta_sgd`` name when no algorithm is given (and in checkpoints
    written before the algorithm was saved by name): metasgd, fomaml or maml."""
    return "metasgd" if meta_sgd else "fomaml" if first_order else "maml"


def check_algorithm(config) -> None:
    """ValueError naming the option when ``config``'s algorithm and options contradict each other."""
    algo = config.algorithm
    if algo not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {', '.join(ALGORITHMS)}, got {algo!r}")
    for flag in ("first_order", "meta_sgd"):
        hint = _CONTRADICTIONS.get((algo, flag))
        if getattr(config, flag) and hint:
            raise ValueError(f"{flag} (--{flag.replace('_', '-')}) contradicts algorithm {algo!r}: {hint}")
    if algo == "fomaml" and not config.first_order:
        raise ValueError("first_order: algorithm 'fomaml' is first order (first_order=True)")
    if algo == "metasgd" and not config.meta_sgd:
        raise ValueError("meta_sgd: algorithm 'metasgd' learns its inner rates (meta_sgd=True)")
    if algo == "protonet":
        for name in INNER_OPTIONS:
            if getattr(config, name) is not None:
                raise ValueError(f"{name} (--{name.replace('_', '-')}): protonet has no inner loop (it classifies "
                                 "queries by their distance to the class prototypes); leave it out")
        if config.memory != "fast" or config.task_chunk is not None:
            raise ValueError("memory / task_chunk (--memory, --task-chunk) are BatchedMAML's options; protonet "
                             "embeds the whole meta-batch in one pass")
        config.check_ints((("train_ways", 2), ("train_shots", 1)))
        return
    for name, test in (("train_ways", "ways"), ("train_shots", "shots")):
        value = getattr(config, name)
        if value is not None and value != getattr(config, test):
            raise ValueError(f"{name} (--{name.replace('_', '-')}) applies to algorithm 'protonet' only; "
                             f"{algo} trains and tests on --{test} ({getattr(config, test)}), got {value}")
    if config.distance is not None:
        raise ValueError(f"distance (--distance) applies to algorithm 'protonet' only, got {config.distance!r} "
                         f"with {algo}")


def embedding_of(model: nn.Module) -> nn.Module:
    """The network without its final linear classifier (Conv4, ResNet-12: the flattened features)."""
    if not isinstance(model, nn.Sequential) or not isinstance(model[-1], nn.Linear):
        raise ValueError(f"protonet: expected a network that ends with its nn.Linear classifier (Conv4, "
                         f"ResNet-12), got {type(model).__name__}")
    return nn.Sequential(*list(model)[:-1])


def build_learner(config, model: nn.Module, device: torch.device) -> Tuple[nn.Module, torch.optim.Optimizer]:
    """(meta-learner, Adam over its parameters) of ``config.algorithm`` on ``model``."""
    from ..algorithms.batched_maml import BatchedMAML
    from ..algorithms.mamlpp import MAMLpp
    from ..algorithms.protonet import ProtoNet

    algo = config.algorithm
    if algo == "protonet":
        learner = ProtoNet(embedding_of(model), distance=config.distance)
    elif algo == "mamlpp":
        learner = MAMLpp(model, inner_lr=config.inner_lr, inner_steps=config.inner_steps,
                         first_order=config.first_order, msl_anneal_iters=MAMLPP_SCHEDULE["msl_anneal_iters"],
                         first_order_iters=MAMLPP_SCHEDULE["first_order_iters"], memory=config.memory,
                         task_chunk=config.task_chunk)
    elif algo in MAML_FAMILY:
        learner = BatchedMAML(model, inner_lr=config.inner_lr, inner_steps=config.inner_steps,
                              first_order=config.first_order, meta_sgd=config.meta_sgd, anil=algo == "anil",
                              loss="cross_entropy", memory=config.memory, task_chunk=config.task_chunk)
    else:
        raise ValueError(f"algorithm must be one of {', '.join(ALGORITHMS)}, got {algo!r}")
    learner = learner.to(device)
    return learner, torch.optim.Adam(learner.parameters(), lr=config.meta_lr)


def train_step(config, learner: nn.Module, optimizer: torch.optim.Optimizer, batch, iteration: int):
    """One meta-update on an episode batch: (loss, mean query accuracy) as detached tensors."""
    if config.algorithm == "protonet":
        from ..algorithms.protonet import train_step as proto_step
        out = proto_step(learner, optimizer, batch)
        return out.loss.detach(), out.accuracies.mean()
    if config.algorithm == "mamlpp":  # the schedules and the cosine meta-lr follow the iteration (resume-proof)
        learner.set_iteration(iteration)
        lo = MAMLPP_SCHEDULE["min_meta_lr"]
        for group in optimizer.param_groups:  # CosineAnnealingLR's closed form, T_max = iterations
            group["lr"] = lo + (config.meta_lr - lo) * (1 + math.cos(math.pi * iteration / config.iterations)) / 2
    out = learner(batch.support_x, batch.support_y, batch.query_x, batch.query_y)
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    optimizer.step()
    return out.loss.detach(), out.task_accuracies.mean()


def evaluate(learner: nn.Module, sampler, episodes: int, steps: Optional[int] = None, seed: Optional[int] = None) -> dict:
    """Accuracy over ``episodes`` fixed episodes of ``sampler``: a ProtoNet classifies by prototypes,
    the MAML family adapts ``steps`` inner steps then predicts. Returns the mean, the 95% CI half-width
    (1.96 std / sqrt(n)), the episode count, the steps (None for protonet) and the per-episode accuracies."""
    from ..algorithms.protonet import ProtoNet, mean_ci95
    from ..algorithms.protonet import evaluate as proto_evaluate
    from ..data.episodes import EVAL_SEED
    from ..functional.modes import eval_mode

    fixed = sampler.fixed_episodes(count=episodes, batch=EVAL_BATCH, seed=EVAL_SEED if seed is None else seed)
    if isinstance(learner, ProtoNet):
        if steps is not None:
            raise ValueError(f"steps: protonet has no inner loop, got steps={steps}")
        return dict(proto_evaluate(learner, fixed, ways=sampler.ways), steps=None)
    if steps is None:
        raise ValueError("steps: the MAML family needs the number of inner steps to adapt with")
    accs = []
    with eval_mode(learner):  # Dropout off; MAML++'s per-step running statistics (per_step_bn_stats) in use
        for ep in fixed:
            fast = learner.adapt(ep.support_x, ep.support_y, steps=steps)
            with torch.no_grad():
                out = learner.predict(fast, ep.query_x)
            accs.append((out.argmax(-1) == ep.query_y).to(torch.float64).mean(1).cpu())
    accs = torch.cat(accs)
    mean, ci = mean_ci95(accs)
    return {"accuracy": mean, "ci95": ci, "episodes": accs.numel(), "steps": steps, "per_episode": accs.tolist()}


def check_episodes(split, ways: int, shots: int, queries: int, names: Tuple[str, str, str]) -> None:
    """ValueError naming the option (``names``: the ways, shots and queries options) when ``split``
    cannot serve ``ways``-way episodes of ``shots`` + ``queries`` images per class."""
    if split.num_classes < ways:
        raise ValueError(f"{names[0]}: {split.name} has {split.num_classes} classes, cannot draw {ways}-way episodes")
    fewest = int(split.counts().min())
    if fewest < shots + queries:
        raise ValueError(f"{names[1]} + {names[2]}: {split.name} has a class with {fewest} images, fewer than "
                         f"{shots} + {queries} = {shots + queries} per episode")
