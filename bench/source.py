"""Which source a result row was measured on: commit and dirty flag (standard library only).

A copy of the tree without .git (the GPU machine gets one) cannot ask git, so before such a run
``python bench/source.py stamp`` writes bench/source.json (git-ignored; carried along with the tree)
and rows measured there read it. Order: $METAFAST_COMMIT (with $METAFAST_DIRTY), git, bench/source.json.

Dirty means a tracked file differs from HEAD, bench/results/ excepted: the benchmarks rewrite their
own rows while they run, and that must not mark the next benchmark's rows dirty.

    python bench/source.py          # print what rows would record
    python bench/source.py stamp    # write bench/source.json
"""
import datetime as _dt
import functools
import json
import os
import subprocess
import sys
from typing import Dict, Optional

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH_DIR)
STAMP = os.path.join(BENCH_DIR, "source.json")


def _git(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def from_git() -> Optional[Dict[str, object]]:
    """{commit, dirty, dirty_files} of the checkout, or None without git or a repository."""
    head = _git("rev-parse", "--short", "HEAD")
    if not head or not head.strip():
        return None
    status = _git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)bench/results")
    if status is None:
        return None
    files = [line[3:] for line in status.splitlines() if line.strip()]
    return {"commit": head.strip(), "dirty": bool(files), "dirty_files": files}


@functools.lru_cache(maxsize=None)
def source() -> Dict[str, object]:
    """{commit, dirty, via}: dirty is None when unknown."""
    env = os.environ.get("METAFAST_COMMIT")
    if env:
        dirty = os.environ.get("METAFAST_DIRTY")
        return {"commit": env, "dirty": None if dirty is None else dirty not in ("", "0", "false"), "via": "env"}
    git = from_git()
    if git is not None:
        return {"commit": git["commit"], "dirty": git["dirty"], "via": "git"}
    if os.path.isfile(STAMP):
        with open(STAMP) as f:
            s = json.load(f)
        return {"commit": s["commit"], "dirty": s["dirty"], "via": "bench/source.json"}
    return {"commit": "unknown", "dirty": None, "via": "none"}


def stamp(path: str = STAMP) -> Dict[str, object]:
    """Write the checkout's commit and dirty state to ``path`` (fails without git)."""
    git = from_git()
    if git is None:
        raise SystemExit("bench/source.py stamp: no git checkout here; stamp where .git exists, before copying the tree")
    git["stamped"] = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    write_json(path, git)
    return git


def write_json(path: str, obj: object) -> str:
    """Write ``obj`` as indented JSON to ``path`` atomically (temp file + rename); returns the path."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
    return path


if __name__ == "__main__":
    if sys.argv[1:] == ["stamp"]:
        print(json.dumps(stamp()))
    elif not sys.argv[1:]:
        print(json.dumps(source()))
    else:
        raise SystemExit(f"usage: python bench/source.py [stamp]; got {sys.argv[1:]}")
