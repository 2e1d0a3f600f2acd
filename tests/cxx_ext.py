"""When the C++ kernel tests may skip: only when metafast._C is legitimately absent (not built at all:
no C++ compiler, or METAFAST_SKIP_EXT) and METAFAST_REQUIRE_EXT is not set. A required extension that
is missing, one that is there but fails to load (ABI mismatch, undefined symbol), and one that loads
without an op the test needs all fail the test module at collection, loudly, instead of skipping."""
import os

import pytest
import torch

REQUIRE_ENV = "METAFAST_REQUIRE_EXT"


def required() -> bool:
    return os.environ.get(REQUIRE_ENV, "0").strip() not in ("", "0")


def skip_reason(*symbols: str):
    """None when metafast._C is loaded with every ``torch.ops.metafast.<symbol>``; the reason to skip
    when it is not built and not required. Fails (pytest.fail) in every other case."""
    try:
        import metafast._C as ext
    except ModuleNotFoundError as e:
        if e.name != "metafast._C":
            raise
        reason = "metafast._C is not built (no C++ compiler at install time, or METAFAST_SKIP_EXT=1)"
        if required():
            pytest.fail(f"{REQUIRE_ENV} is set but {reason}: build it (pip install --no-build-isolation -e .)",
                        pytrace=False)
        return reason
    except ImportError as e:  # built, but does not load: never a reason to skip
        pytest.fail(f"metafast._C is built but fails to import ({e}); rebuild it against this torch "
                    f"({torch.__version__})", pytrace=False)
    missing = [s for s in symbols if not hasattr(torch.ops.metafast, s)]
    if missing:
        pytest.fail(f"metafast._C ({ext.__file__}) loads but lacks {', '.join('metafast::' + s for s in missing)}: "
                    "it is stale, rebuild it", pytrace=False)
    return None


def skipif_missing(*symbols: str):
    """A pytest mark: skip when :func:`skip_reason` gives a reason (evaluated at import)."""
    reason = skip_reason(*symbols)
    return pytest.mark.skipif(reason is not None, reason=reason or "")
