"""Episode sampling cost against the work it feeds: drawing one meta-batch of 32 Omniglot 5-way 1-shot
episodes (1 query per class, the MAML paper's meta-batch) vs one second-order BatchedMAML meta-step
on Conv4.omniglot over that batch, in the same run. The ratio says whether sampling can starve the
training loop: sampling_ms / meta_step_ms should be far below 1.

The images are a synthetic split with the shape of Omniglot's 'train' split with rotation classes
(4112 classes x 20 images of 28x28 uint8), so no dataset download is needed; sampling cost depends
only on that shape.

    python bench/bench_sampler.py [--device cpu|cuda] [--quick] [--out DIR]
"""
import argparse
import os
import sys
from typing import List, Optional, Union

import torch

if __package__ in (None, ""):  # run as a script: make `bench` and `metafast` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import RESULTS_DIR, RowSink, as_sink, base_row, finish, print_table, time_ms  # noqa: E402

BENCH = "sampler"
COLUMNS = ["what", "ms", "vs_meta_step", "tasks", "classes", "threads"]
OMNIGLOT_TRAIN_CLASSES = 1028 * 4
DRAWINGS = 20


def _split(classes: int):
    from metafast.data.episodes import ImageSplit

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (classes * DRAWINGS, 1, 28, 28), dtype=torch.uint8, generator=g)
    labels = torch.arange(classes).repeat_interleave(DRAWINGS)
    return ImageSplit(images, labels, [str(c) for c in range(classes)], "omniglot-shaped")


def run(device: Union[str, torch.device] = "cpu", quick: bool = False, threads: int = 1,
        sink: Optional[RowSink] = None) -> List[dict]:
    from metafast import BatchedMAML
    from metafast.data.episodes import EpisodeSampler
    from metafast.models import Conv4

    device = torch.device(device)
    sink = as_sink(sink)
    sink.expect(3)
    old = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(threads)  # 2 threads stall when the machine is shared
    try:
        tasks = 4 if quick else 32
        classes = 400 if quick else OMNIGLOT_TRAIN_CLASSES
        sampler = EpisodeSampler(_split(classes), ways=5, shots=1, queries=1, device=device, seed=0)
        torch.manual_seed(0)
        maml = BatchedMAML(Conv4.omniglot(5), inner_lr=0.4, inner_steps=1, loss="cross_entropy").to(device)
        opt = torch.optim.Adam(maml.parameters(), lr=1e-3)
        batch = sampler.sample(tasks)

        def step():
            out = maml(batch.support_x, batch.support_y, batch.query_x, batch.query_y)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()

        repeats = 3 if quick else 7
        load_before = os.getloadavg()[0]
        sample_ms = time_ms(lambda: sampler.sample(tasks), device, warmup=2, repeats=repeats)
        draw_ms = time_ms(lambda: sampler.draw_indices(tasks, sampler.generator), device, warmup=2, repeats=repeats)
        step_ms = time_ms(step, device, warmup=1, repeats=repeats)
        nthreads = torch.get_num_threads() if device.type == "cpu" else None
        for what, ms in (("sample (indices + gather)", sample_ms), ("draw indices only", draw_ms),
                         ("meta-step (Conv4, 2nd order)", step_ms)):
            sink.add(dict(base_row(BENCH, device), what=what, ms=ms, vs_meta_step=ms / step_ms, tasks=tasks,
                          classes=classes, threads=nthreads, quick=quick,
                          load_avg_1min_before=load_before, load_avg_1min_after=os.getloadavg()[0]))
        return sink.rows
    finally:
        torch.set_num_threads(old)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=RESULTS_DIR, help="where to write sampler_<device>.json")
    args = p.parse_args(argv)
    sink = RowSink(None if args.quick else f"{BENCH}_{args.device}", args.out)  # a quick run writes nothing
    rows = run(args.device, quick=args.quick, threads=args.threads, sink=sink)
    print_table(rows, COLUMNS)
    return finish(sink)


if __name__ == "__main__":
    sys.exit(main())
