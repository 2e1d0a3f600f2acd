"""Every figure in the README's benchmark tables is a field of a row in bench/results.

The tables of the Benchmarks section are rendered from the results files (bench/readme_tables.py);
these tests fail when a table was edited by hand, when the results changed without the README, or
when a GPU table quotes rows not measured on the code at HEAD.
"""
import math
import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import readme_tables  # noqa: E402

NUMBER = re.compile(r"^(\d+(?:\.\d+)?(?:e[-+]?\d+)?)x?(?: |$)")


def _section() -> str:
    with open(readme_tables.README) as f:
        text = f.read()
    start = text.index("## Benchmarks\n")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def _blocks():
    """{name: the lines between its markers} of the Benchmarks section."""
    out, name, lines = {}, None, []
    for line in _section().splitlines():
        m = readme_tables.BEGIN.fullmatch(line.strip())
        if m:
            name, lines = m.group(1), []
        elif line.strip() == readme_tables.END:
            out[name], name = lines, None
        elif name is not None:
            lines.append(line)
    return out


def _values(obj):
    if isinstance(obj, bool):
        return
    if isinstance(obj, str) and re.fullmatch(r"\d+", obj):  # an all-digit commit hash
        yield obj
    elif isinstance(obj, (int, float)):
        yield float(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _values(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _values(v)


def _matches(token: str, values) -> bool:
    """Whether a value printed the way ``token`` is printed gives ``token``."""
    if token in values:
        return True
    values = [v for v in values if isinstance(v, float)]
    if "e" in token:
        digits = len(token.split("e")[0].split(".")[1]) if "." in token else 0
        return any(f"{v:.{digits}e}" == token for v in values)
    digits = len(token.split(".")[1]) if "." in token else 0
    return any(math.isfinite(v) and f"{v:.{digits}f}" == token for v in values)


def test_benchmark_section_has_no_hand_written_table():
    inside = set()
    for lines in _blocks().values():
        inside.update(line for line in lines if line.startswith("|"))
    stray = [line for line in _section().splitlines() if line.startswith("|") and line not in inside]
    assert not stray, f"tables in README's Benchmarks section outside a bench-table block: {stray[:3]}"
    assert set(_blocks()) == set(readme_tables.TABLES), sorted(_blocks())


@pytest.mark.parametrize("name", sorted(readme_tables.TABLES))
def test_table_is_rendered_from_its_results(name):
    assert _blocks()[name] == readme_tables.render(name), \
        f"README table {name} differs from bench/results: run python bench/readme_tables.py"


@pytest.mark.parametrize("name", sorted(readme_tables.TABLES))
def test_every_table_number_is_in_a_results_file(name):
    files = [f.strip() for f in readme_tables.TABLES[name][0].split(",") if f.strip()]
    values = []
    for f in files:
        values += list(_values(readme_tables.load(f)))  # a missing file has no rows
    checked = 0
    for line in _blocks()[name]:
        if not line.startswith("|") or set(line) <= set("|-: "):
            continue
        for cell in line.strip("|").split("|")[1:]:  # the first column is the case's label
            m = NUMBER.match(cell.strip())
            if m:
                checked += 1
                assert _matches(m.group(1), values), f"{name}: {cell.strip()!r} is in no row of {files}"
    if any(line.startswith("|") for line in _blocks()[name]):
        assert checked > 0, f"{name}: no number checked"


def test_gpu_table_only_from_rows_at_head(monkeypatch):
    rows = [{"bench": "maml_step", "device": "NVIDIA H100", "torch": "2.11.0", "commit": "0000000", "dirty": False,
             "date": "2026-12-07", "workload": "sinusoid", "method": "metafast", "ms": 1.0,
             "speedup_vs_torch_func": 30.0, "speedup_vs_loop": 80.0, "grad_rel_err_vs_loop": 1e-7}]
    monkeypatch.setattr(readme_tables, "load", lambda name: rows)
    monkeypatch.setattr(readme_tables, "code_at_head", lambda commit: False)
    assert "compiled and interpreted only" in "\n".join(readme_tables.render("maml_step_cuda"))
    monkeypatch.setattr(readme_tables, "code_at_head", lambda commit: True)
    assert "| **metafast** | 1.00 | 30.00x | 80.00x |" in "\n".join(readme_tables.render("maml_step_cuda"))
    rows[0]["dirty"] = True  # a dirty tree is not HEAD's code either
    assert "compiled and interpreted only" in "\n".join(readme_tables.render("maml_step_cuda"))


def test_a_number_not_in_the_results_is_caught():
    assert _matches("6.35", [6.3512]) and not _matches("6.36", [6.3512])
    assert _matches("1.8e-07", [1.79e-7]) and not _matches("1.9e-07", [1.79e-7])
