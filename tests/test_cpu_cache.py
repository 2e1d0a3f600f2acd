"""metafast.cpu_cache: the caching CPU allocator around the meta-step (csrc/cpu_cache.cpp): blocks are
reused inside scopes, freed blocks return to the cache, the limit and empty() release memory, small
blocks and out-of-scope allocations pass through, and a Conv4 meta-step gives the same meta-gradient
with and without it."""
import pytest
import torch

from metafast import BatchedMAML, cpu_cache
from metafast.models import Conv4

from cxx_ext import skipif_missing

pytestmark = skipif_missing("cpu_cache_enter", "cpu_cache_exit", "cpu_cache_stats")

MB = 1 << 20


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch):
    monkeypatch.delenv(cpu_cache.ENV, raising=False)
    cpu_cache.set_enabled(None)
    cpu_cache.set_limit(1 << 30)  # also empties it
    yield
    cpu_cache.set_enabled(None)
    cpu_cache.set_limit(1 << 30)


def _delta(before, after, key):
    return after[key] - before[key]


def test_blocks_are_reused_inside_a_scope():
    with cpu_cache.scope() as active:
        assert active and cpu_cache.stats()["depth"] == 1
        s0 = cpu_cache.stats()
        a = torch.full((MB,), 3.0)  # 4 MB
        ptr = a.data_ptr()
        del a
        s1 = cpu_cache.stats()
        assert _delta(s0, s1, "misses") == 1 and s1["cached_bytes"] == s0["cached_bytes"] + 4 * MB
        b = torch.empty(MB - 1000)  # slightly smaller: the same block
        assert b.data_ptr() == ptr and _delta(s1, cpu_cache.stats(), "hits") == 1
        b.fill_(2.0)
        assert b.sum().item() == 2.0 * b.numel()
        small = torch.ones(1000)  # below 256 KB: not counted
        del small
        assert _delta(s1, cpu_cache.stats(), "misses") == 0
        big = torch.empty(4 * MB)  # 16 MB: no cached block fits
        assert big.data_ptr() != ptr and _delta(s1, cpu_cache.stats(), "misses") == 1
    assert cpu_cache.stats()["depth"] == 0 and cpu_cache.stats()["installed"] == 1


def test_outside_scopes_nothing_is_cached_and_late_frees_return():
    with cpu_cache.scope():
        kept = torch.empty(MB)
    s0 = cpu_cache.stats()
    outside = torch.empty(2 * MB)
    del outside
    s1 = cpu_cache.stats()
    assert s1["hits"] == s0["hits"] and s1["misses"] == s0["misses"] and s1["cached_bytes"] == s0["cached_bytes"]
    del kept  # made in the scope, freed after it: back to the cache
    assert cpu_cache.stats()["cached_bytes"] == s0["cached_bytes"] + 4 * MB


def test_limit_and_empty_release_memory():
    cpu_cache.set_limit(6 * MB)
    with cpu_cache.scope():
        a, b = torch.empty(MB), torch.empty(MB)  # 4 MB each
        del a, b  # the second one would pass the limit: freed
    assert cpu_cache.stats()["cached_bytes"] == 4 * MB and cpu_cache.stats()["cached_blocks"] == 1
    cpu_cache.empty()
    assert cpu_cache.stats()["cached_bytes"] == 0 and cpu_cache.stats()["cached_blocks"] == 0
    with pytest.raises(ValueError, match="limit_bytes: expected an int >= 0"):
        cpu_cache.set_limit(-1)


def test_nesting_disabling_and_other_devices(monkeypatch):
    with cpu_cache.scope() as outer:
        with cpu_cache.scope() as inner:
            assert outer and inner and cpu_cache.stats()["depth"] == 2
        assert cpu_cache.stats()["depth"] == 1
    assert cpu_cache.stats()["depth"] == 0
    with cpu_cache.scope("meta") as active:
        assert not active and cpu_cache.stats()["depth"] == 0
    monkeypatch.setenv(cpu_cache.ENV, "0")
    with cpu_cache.scope() as active:
        assert not active
    monkeypatch.setenv(cpu_cache.ENV, "maybe")
    with pytest.raises(ValueError, match="METAFAST_CPU_CACHE: expected 0 or 1"):
        cpu_cache.enabled()
    monkeypatch.delenv(cpu_cache.ENV)
    cpu_cache.set_enabled(False)
    with cpu_cache.scope() as active:
        assert not active
    with pytest.raises(TypeError, match="on: expected a bool or None"):
        cpu_cache.set_enabled("yes")


def test_scope_closes_on_error():
    with pytest.raises(RuntimeError, match="boom"):
        with cpu_cache.scope():
            raise RuntimeError("boom")
    assert cpu_cache.stats()["depth"] == 0


def test_conv4_meta_step_reuses_blocks_and_gives_the_same_meta_gradient():
    torch.manual_seed(0)
    model = Conv4(5, hidden=16, image_size=28, stride=2)
    maml = BatchedMAML(model, inner_lr=0.4, inner_steps=1, loss="cross_entropy")
    g = torch.Generator().manual_seed(0)
    batch = (torch.rand(8, 5, 1, 28, 28, generator=g), torch.arange(5).repeat(8, 1),
             torch.rand(8, 5, 1, 28, 28, generator=g), torch.arange(5).repeat(8, 1))

    def meta_grad():
        return torch.autograd.grad(maml(*batch).loss, list(model.parameters()))

    cpu_cache.set_enabled(False)
    ref = meta_grad()
    cpu_cache.set_enabled(True)
    meta_grad()
    s0 = cpu_cache.stats()
    got = meta_grad()
    s1 = cpu_cache.stats()
    assert _delta(s0, s1, "hits") > 0 and _delta(s0, s1, "misses") == 0, (s0, s1)
    for a, b in zip(got, ref):
        assert torch.equal(a, b)


def test_info_reports_the_cache(monkeypatch):
    from metafast import _backend

    assert _backend.describe()["CPU block cache"].startswith("on for BatchedMAML's CPU meta-steps")
    monkeypatch.setenv(cpu_cache.ENV, "0")
    assert _backend.describe()["CPU block cache"].startswith("off")


def test_a_forked_child_uses_the_cache():
    import os
    import signal

    with cpu_cache.scope():
        kept = torch.empty(MB)
    pid = os.fork()
    if pid == 0:  # the child: the cache's lock must be free, its blocks usable
        code = 1
        try:
            signal.signal(signal.SIGALRM, signal.SIG_DFL)  # a hang kills the child (the parent then fails)
            signal.alarm(60)
            torch.set_num_threads(1)  # as DataLoader workers do: OpenMP's pool does not survive fork
            with cpu_cache.scope():
                x = torch.ones(2 * MB)
                ok = x.sum().item() == 2 * MB
                del x
            code = 0 if ok and cpu_cache.stats()["depth"] == 0 else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    del kept
