"""``hf-eot compare``: every regularizer on the packaged pretrained MiniLM, next to "sdpa"."""

import json

import pytest

from hf_eot.cli import main
from hf_eot.compare import DEFAULT_SETTINGS


@pytest.mark.filterwarnings("ignore::hf_eot.ops.sinkhorn.SinkhornConvergenceWarning")
def test_compare_table_on_the_packaged_checkpoint(tmp_path, capsys) -> None:
    """One row per setting; plain softmax reproduces "sdpa" (cosine 1, round-off deviation), the sparse
    maps have exact zeros, every map's rows sum to one, and Sinkhorn's columns are close to one."""
    out = tmp_path / "rows.json"
    assert main(["compare", "--max-examples", "4", "--json", str(out)]) == 0
    rows = {r["label"]: r for r in json.loads(out.read_text())}
    assert list(rows) == [label for label, _, _ in DEFAULT_SETTINGS]
    assert rows["softmax"]["cosine_to_sdpa"] > 0.99999 and rows["softmax"]["max_abs_deviation"] < 1e-4
    assert rows["sparsemax"]["sparsity"] > 0.3 and rows["softmax"]["sparsity"] == 0.0
    assert all(r["row_error"] < 1e-4 for r in rows.values())
    assert rows["sinkhorn"]["column_error"] < 0.05 < rows["softmax"]["column_error"]
    assert "| sinkhorn |" in capsys.readouterr().out


def test_compare_rejects_a_missing_model(capsys) -> None:
    """A model path that does not exist is a one-line error with exit status 2."""
    assert main(["compare", "/no/such/model"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_compare_runs_the_named_specs_in_order(tmp_path) -> None:
    """--regularizers runs exactly the given spec strings, labelled by them, with their parameters: a
    larger alpha gives sparser weights, and a Sinkhorn capped at 2 iterations is further from doubly
    stochastic than the default settings allow."""
    out = tmp_path / "rows.json"
    specs = ["entmax:alpha=1.9", "entmax:alpha=1.2", "sinkhorn:n_iters=2"]
    assert main(["compare", "--max-examples", "3", "--regularizers", *specs, "--json", str(out), "--quiet"]) == 0
    rows = json.loads(out.read_text())
    assert [r["label"] for r in rows] == specs
    assert [r["regularizer"] for r in rows] == ["entmax", "entmax", "sinkhorn"]
    assert rows[0]["sparsity"] > rows[1]["sparsity"] > 0.0
    assert rows[2]["column_error"] > 1e-3


@pytest.mark.parametrize(("spec", "named"), [("entmax:alpah=1.3", "alpah"), ("sparsemaxx", "sparsemaxx")])
def test_compare_rejects_a_bad_spec_in_one_line(spec, named, capsys) -> None:
    """A misspelt regularizer or parameter is a one-line error naming it, with exit status 2."""
    assert main(["compare", "--regularizers", "softmax", spec]) == 2
    err = capsys.readouterr().err
    assert named in err and err.count("\n") == 1
