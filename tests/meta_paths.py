"""Which path a BatchedMAML meta-step takes, read from its describe() text: the one place the tests assert
it, so a change in how BatchedMAML reports its paths is adapted here alone."""
from typing import Optional


def _line(maml, prefix: str) -> str:
    lines = [ln for ln in maml.describe().splitlines() if ln.startswith(prefix)]
    assert len(lines) == 1, f"describe() has no single {prefix!r} line:\n{maml.describe()}"
    return lines[0]


def is_fused(maml) -> bool:
    """True when the meta-step runs the fused inner-loop op, False on the batched layers."""
    line = _line(maml, "meta-step:")
    return "batched layers" not in line and "fused inner loop" in line


def is_exact_reverse(maml) -> bool:
    """True when the batched path's meta-gradient is the exact reverse, False for autograd through the
    unrolled inner loop."""
    line = _line(maml, "meta-gradient:")
    assert line.startswith(("meta-gradient: exact reverse", "meta-gradient: autograd")), line
    return line.startswith("meta-gradient: exact reverse")


def assert_path(maml, fused: bool, exact_reverse: Optional[bool] = None) -> None:
    """The meta-step runs fused or on the batched layers as ``fused`` says; on the batched layers its
    meta-gradient is the exact reverse or autograd as ``exact_reverse`` says (None: not checked)."""
    assert is_fused(maml) == fused, f"expected the {'fused' if fused else 'batched'} path:\n{maml.describe()}"
    if exact_reverse is not None and not fused:
        assert is_exact_reverse(maml) == exact_reverse, (
            f"expected the {'exact reverse' if exact_reverse else 'autograd'} meta-gradient:\n{maml.describe()}")


def path_taken(maml) -> str:
    """The name of the path the last meta-step's batch signature runs (BatchedMAML remembers one per signature)."""
    assert len(maml._signatures) == 1, f"expected one batch signature, got {len(maml._signatures)}"
    return next(iter(maml._signatures.values()))[0].name
