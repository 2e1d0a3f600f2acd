"""pytest-benchmark over the kernel microbenchmarks (bench/test_microbenchmarks.py):

    pytest bench/ --benchmark-only                          time every case
    pytest bench/ --benchmark-only --benchmark-save=NAME    also write .benchmarks/<machine>/NNNN_NAME.json
    pytest bench/ --benchmark-only --benchmark-compare      compare with the latest saved run

`metafast bench` (bench/bench_<op>.py) stays the command-line entry that writes bench/results rows;
these tests time the same cases (sizes and implementations imported from those files) with
pytest-benchmark's statistics instead. The repository's `pytest` (testpaths = tests) never collects
bench/. Without pytest-benchmark installed every benchmark is skipped with that reason.
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `bench` and `metafast`


def pytest_collection_modifyitems(config, items):
    if config.pluginmanager.hasplugin("benchmark"):
        return
    skip = pytest.mark.skip(reason="pytest-benchmark is not installed (pip install pytest-benchmark)")
    for item in items:
        item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
