"""The support table (scripts/support_table.py) cannot drift from the tests: every "exact"
cell names a test that exists and runs on that family (and method), every "refused" cell
is refused with its reason when run, every "n/a: no biases" family has no biases; and the
generator writes the table between its markers."""

import importlib
from pathlib import Path

import pytest

import unipelt_fast as up
from scripts import support_table
from tests import support_matrix as sm
from tests.hf_families import ALL, tiny, tiny_batch

CELLS = [(k, m, sm.MATRIX[k][m]) for k in sm.FAMILIES for m in sm.METHODS]


def test_matrix_is_complete():
    assert set(sm.FAMILIES) == set(sm.MATRIX) and set(sm.FAMILIES) <= set(ALL)
    for kind, row in sm.MATRIX.items():
        assert set(row) == set(sm.METHODS), kind
        types = (sm.Exact, sm.Refused, sm.NotApplicable, sm.Untested)
        assert all(isinstance(c, types) for c in row.values()), kind


def _param_values(fn, name: str) -> set:
    """The values of parameter ``name`` over ``fn``'s @pytest.mark.parametrize marks."""
    out = set()
    for mark in getattr(fn, "pytestmark", []):
        if mark.name != "parametrize":
            continue
        names = (
            [n.strip() for n in mark.args[0].split(",")]
            if isinstance(mark.args[0], str)
            else list(mark.args[0])
        )
        if name not in names:
            continue
        i = names.index(name)
        for v in mark.args[1]:
            v = getattr(v, "values", v)  # pytest.param
            out.add(v[i] if len(names) > 1 else v)
    return out


@pytest.mark.parametrize("kind,method,cell", [c for c in CELLS if isinstance(c[2], sm.Exact)])
def test_exact_cells_name_a_test_that_runs_on_them(kind, method, cell):
    path, func = cell.test.split("::")
    assert Path(path).parent.name == "tests" and (Path(__file__).parents[1] / path).is_file()
    mod = importlib.import_module(f"tests.{Path(path).stem}")
    fn = getattr(mod, func, None)
    assert callable(fn), f"{cell.test} does not exist"
    if cell.param is not None:
        assert kind in _param_values(fn, cell.param), f"{cell.test} does not run on {kind}"
    if cell.method_param is not None:
        want = cell.method_value or method
        assert want in _param_values(fn, cell.method_param), f"{cell.test} lacks {want}"


REFUSED = [c for c in CELLS if isinstance(c[2], sm.Refused)]


@pytest.mark.parametrize("kind,method,cell", REFUSED)
def test_refused_cells_are_refused_with_their_reason(kind, method, cell):
    cfg = up.UniPELTConfig(gate_mode="masked_mean", **sm.METHOD_CONFIGS[method])
    with pytest.raises(NotImplementedError, match=cell.match):
        m = up.apply_unipelt(tiny(kind), cfg, backend="eager")
        m(**tiny_batch(kind))


def test_no_bias_cells_have_no_biases():
    for kind, _, cell in CELLS:
        if isinstance(cell, sm.NotApplicable) and "bias" in cell.reason:
            names = [n for n, _ in tiny(kind).named_parameters() if n.endswith("bias")]
            assert not names, (kind, names[:3])


def test_table_has_every_family_and_method():
    t = support_table.table()
    rows = [r for r in t.splitlines() if r.startswith("| ")]
    assert rows[0] == "| Family | Prefix | Adapter | LoRA | BitFit | Prompt | Gates |"
    assert [r.split(" | ")[0][2:] for r in rows[1:]] == list(sm.FAMILIES.values())
    assert all(r.count(" | ") == len(sm.METHODS) for r in rows)
    assert "| gpt-oss | exact (HF cache); sliding window too |" in t  # sinks and a window on
    assert "| DeBERTa-v2 | refused: disentangled attention" in t


def test_generator_writes_between_the_markers(tmp_path):
    md = tmp_path / "README.md"
    md.write_text(
        f"# Title\n\nintro\n{support_table.START}\nold table\n{support_table.END}\nrest\n"
    )
    assert support_table.main([str(md), "--check"]) == 1  # stale
    assert support_table.main([str(md)]) == 0
    text = md.read_text()
    assert text.startswith("# Title\n\nintro\n" + support_table.START + "\n| Family |")
    assert text.endswith(support_table.END + "\nrest\n") and "old table" not in text
    assert support_table.table() in text
    assert support_table.main([str(md), "--check"]) == 0  # up to date, and idempotent
    assert md.read_text() == text
    assert not [p for p in tmp_path.iterdir() if p.name != "README.md"]  # no temp left


@pytest.mark.parametrize(
    "text",
    [
        "no markers\n",
        f"{support_table.END}\n{support_table.START}\n",  # reversed
        f"{support_table.START}\n{support_table.END}\n{support_table.START}\n",  # two starts
    ],
)
def test_generator_refuses_bad_markers(tmp_path, text):
    md = tmp_path / "doc.md"
    md.write_text(text)
    assert support_table.main([str(md)]) == 2
    assert md.read_text() == text  # untouched


def test_every_oracle_is_explained_in_the_docs():
    oracles = {c.oracle for _, _, c in CELLS if isinstance(c, sm.Exact)}
    doc = (Path(__file__).parents[1] / "docs" / "attention-contract.md").read_text()
    for o in oracles:
        assert f"exact ({o})" in doc, o


def test_readme_carries_the_current_table():
    readme = Path(__file__).resolve().parents[1] / "README.md"
    assert support_table.main([str(readme), "--check"]) == 0, (
        "README.md's support table is stale: run `python scripts/support_table.py README.md`"
    )


def test_sliding_window_notes_are_the_windowed_test_families():
    """A prefix cell noting sliding windows names a family the windowed test runs."""
    from tests.test_attention_contract import WINDOWED

    noted = {k for k, m, c in CELLS if m == "prefix" and sm.WINDOW_NOTE in c.text()}
    assert noted == set(WINDOWED)
