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
