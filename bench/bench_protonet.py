"""ProtoNet episode step: metafast.ProtoNet (one embedding pass over all episodes) vs learn2learn's
ProtoNet example loop (one embedding pass per episode), same embedding, same episodes, same run.

Setting: Conv4 Omniglot-shaped (Conv4.omniglot without its head: 64 channels, stride 2, transductive
BN; 28x28x1 images), 20-way 5-shot, 5 (default) or 15 queries per class, 32 episodes. A step is
zero_grad + forward + backward of the mean episode loss + one Adam step; metafast's is
``metafast.algorithms.protonet.train_step`` (the step a training job calls), which runs in the CPU
block cache (metafast.cpu_cache); the process keeps freed memory (glibc) for both. The baseline reproduces
``fast_adapt`` of learn2learn's examples/vision/protonet_miniimagenet.py (sort the episode by label,
embed support and query together, numpy boolean support mask, reshape-mean prototypes,
pairwise_distances_logits, cross_entropy) once per episode, backward per episode (loss / T, so the
gradient is the mean over episodes). ProtoNet's default batchnorm="episode" gives every episode its
own BN statistics, as the loop does, so both compute the same gradient: checked before timing (a
mismatch exits non-zero).

CPU timing: interleaved rounds (loop, metafast, loop, ...), each a median of repeated perf_counter
runs; the row reports the median over rounds of each and the median of the per-round ratios.

    python bench/bench_protonet.py [--queries 5|15] [--rounds 3] [--threads 2] [--quick] [--out DIR]
"""
import argparse
import os
import statistics
import sys
from typing import List

import numpy as np
import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script: make `bench` and `metafast` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import RESULTS_DIR, base_row, keep_freed_memory, print_table, time_ms, write_rows  # noqa: E402

BENCH = "protonet"
COLUMNS = ["impl", "ms", "speedup_vs_l2l_loop", "episodes", "ways", "shots", "queries", "threads"]


# -- learn2learn's ProtoNet example (examples/vision/protonet_miniimagenet.py), per episode ----------
def l2l_pairwise_distances_logits(a, b):
    n = a.shape[0]
    m = b.shape[0]
    logits = -((a.unsqueeze(1).expand(n, m, -1) - b.unsqueeze(0).expand(n, m, -1)) ** 2).sum(dim=2)
    return logits


def l2l_accuracy(predictions, targets):
    predictions = predictions.argmax(dim=1).view(targets.shape)
    return (predictions == targets).sum().float() / targets.size(0)


def l2l_fast_adapt(model, batch, ways, shot, query_num, device):
    data, labels = batch
    data = data.to(device)
    labels = labels.to(device)

    # Sort data samples by labels
    sort = torch.sort(labels)
    data = data.squeeze(0)[sort.indices].squeeze(0)
    labels = labels.squeeze(0)[sort.indices].squeeze(0)

    # Compute support and query embeddings
    embeddings = model(data)
    support_indices = np.zeros(data.size(0), dtype=bool)
    selection = np.arange(ways) * (shot + query_num)
    for offset in range(shot):
        support_indices[selection + offset] = True
    query_indices = torch.from_numpy(~support_indices)
    support_indices = torch.from_numpy(support_indices)
    support = embeddings[support_indices]
    support = support.reshape(ways, shot, -1).mean(dim=1)
    query = embeddings[query_indices]
    labels = labels[query_indices].long()

    logits = l2l_pairwise_distances_logits(query, support)
    loss = F.cross_entropy(logits, labels)
    acc = l2l_accuracy(logits, labels)
    return loss, acc


# -- the setting -------------------------------------------------------------------------------------
def embedding():
    from metafast.models import Conv4

    return torch.nn.Sequential(*list(Conv4.omniglot(ways=2))[:-1])  # drop the linear head: 256-d features


def make_episodes(T, ways, shots, queries, generator):
    """T episodes as learn2learn's TaskDataset yields them ((data [ways*(shots+queries), 1, 28, 28],
    labels) in random order) and the same episodes in metafast's layout: which images are support is
    what fast_adapt's label sort decides."""
    per = shots + queries
    l2l_batches, support_x, query_x = [], [], []
    for _ in range(T):
        data = torch.rand(ways * per, 1, 28, 28, generator=generator)
        labels = torch.arange(ways).repeat_interleave(per)[torch.randperm(ways * per, generator=generator)]
        l2l_batches.append((data, labels))
        by_class = data[torch.sort(labels).indices].view(ways, per, 1, 28, 28)
        support_x.append(by_class[:, :shots].flatten(0, 1))
        query_x.append(by_class[:, shots:].flatten(0, 1))
    classes = torch.arange(ways)
    support_y = classes.repeat_interleave(shots).expand(T, -1).contiguous()
    query_y = classes.repeat_interleave(queries).expand(T, -1).contiguous()
    return l2l_batches, (torch.stack(support_x), support_y, torch.stack(query_x), query_y)


def run(queries: int = 5, rounds: int = 3, threads: int = 2, quick: bool = False, repeats: int = 3) -> List[dict]:
    from metafast import ProtoNet
    from metafast.algorithms.protonet import train_step
    from metafast.data.episodes import Episodes

    torch.set_num_threads(threads)
    keep_freed_memory()  # both implementations: glibc keeps freed blocks (as `metafast train` sets it)
    device = torch.device("cpu")
    T, ways, shots = (4, 5, 5) if quick else (32, 20, 5)
    g = torch.Generator().manual_seed(0)
    l2l_batches, batch = make_episodes(T, ways, shots, queries, g)
    torch.manual_seed(0)
    model = embedding()
    net = ProtoNet(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def l2l_loss_backward():
        for b in l2l_batches:
            (l2l_fast_adapt(model, b, ways, shots, queries, device)[0] / T).backward()

    def l2l_step():
        opt.zero_grad()
        l2l_loss_backward()
        opt.step()

    episodes = Episodes(*batch, classes=None)

    def metafast_step():
        train_step(net, opt, episodes)  # zero_grad + forward + backward + step in a cpu_cache scope

    # gradient check: both compute the gradient of the same mean episode loss
    grads = {}
    for name, backward in (("l2l_loop", l2l_loss_backward), ("metafast", lambda: net(*batch).loss.backward())):
        opt.zero_grad()
        backward()
        grads[name] = torch.cat([p.grad.flatten() for p in model.parameters()])
    err = ((grads["metafast"] - grads["l2l_loop"]).abs().max() / grads["l2l_loop"].abs().max()).item()
    print(f"gradient check: max |metafast - l2l loop| / max |l2l loop| = {err:.2e}")
    if not err < 1e-3:
        raise SystemExit(f"gradient check failed: relative error {err:.2e} >= 1e-3")

    load_before = os.getloadavg()[0]
    warmup = 1
    per_round = {"l2l_loop": [], "metafast": []}
    for r in range(rounds):
        for name, step in (("l2l_loop", l2l_step), ("metafast", metafast_step)):
            per_round[name].append(time_ms(step, device, warmup=warmup, repeats=repeats))
        print(f"round {r + 1}/{rounds}: l2l loop {per_round['l2l_loop'][-1]:.0f} ms, "
              f"metafast {per_round['metafast'][-1]:.0f} ms", flush=True)
    ratios = [a / b for a, b in zip(per_round["l2l_loop"], per_round["metafast"])]
    load_after = os.getloadavg()[0]
    rows = []
    for name in ("l2l_loop", "metafast"):
        rows.append({**base_row(BENCH, device), "impl": name, "ms": statistics.median(per_round[name]),
                     "speedup_vs_l2l_loop": 1.0 if name == "l2l_loop" else statistics.median(ratios),
                     "episodes": T, "ways": ways, "shots": shots, "queries": queries, "threads": threads,
                     "embedding": "Conv4.omniglot body (64 ch, stride 2, BN), 28x28x1",
                     "step": "zero_grad + forward + backward + Adam (metafast: train_step, CPU block cache)", "grad_rel_err": err,
                     "ms_rounds": per_round[name], "speedup_rounds": ratios if name == "metafast" else None,
                     "quick": quick, "repeats": repeats, "load_avg_1min_before": load_before, "load_avg_1min_after": load_after})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--queries", type=int, default=5, help="queries per class (5 or 15)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per round (after one warm-up)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="5-way, 4 episodes; writes nothing")
    p.add_argument("--out", default=RESULTS_DIR, help="where to write protonet_cpu.json")
    args = p.parse_args(argv)
    rows = run(args.queries, args.rounds, args.threads, args.quick, args.repeats)
    print_table(rows, COLUMNS)
    if not args.quick:
        print(write_rows(f"{BENCH}_cpu", rows, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
