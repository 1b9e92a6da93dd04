"""hf_eot.analysis.output: results are written without overwriting or deleting anything else."""

import json

import _checkpoints
import _tiny
import pytest

from hf_eot.analysis import analyze
from hf_eot.analysis.output import MARKER, OutputFolderError, check_output_folder, write_results


@pytest.fixture(scope="module")
def result():
    """The analysis of a one-layer tiny BERT on one padded batch."""
    return analyze(_tiny.model("bert", "eager", num_hidden_layers=1), _tiny.text_batch(2, 5))


def test_marker_lists_every_file_with_its_hash(result, tmp_path):
    """The marker of a result folder names every file written there (figures included) with its SHA-256."""
    import hashlib

    pytest.importorskip("matplotlib")
    write_results([("m", result)], tmp_path / "out")
    folder = tmp_path / "out" / "m"
    listed = json.loads((folder / MARKER).read_text())["files"]
    on_disk = {
        p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != MARKER
    }
    assert set(listed) == on_disk and any(name.startswith("figures/") for name in listed)
    for name, digest in listed.items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest


def test_own_results_are_replaced_and_foreign_or_edited_ones_refused(result, tmp_path):
    out = tmp_path / "out"
    write_results([("m", result)], out, figures=False)
    write_results([("m", result)], out, figures=False)  # ours and unchanged: replaced
    (out / "m" / "extra").mkdir()
    with pytest.raises(OutputFolderError, match="extra/"):
        write_results([("m", result)], out, figures=False)
    (out / "m" / "extra").rmdir()
    (out / "m" / "results.json").write_text("{}")
    with pytest.raises(OutputFolderError, match="results.json"):
        check_output_folder(out, ["m"])
    (out / "m" / MARKER).unlink()
    with pytest.raises(OutputFolderError, match="did not write"):
        check_output_folder(out, ["m"])
    check_output_folder(out, ["other"])  # other labels are unaffected


def test_index_readme_is_rewritten_only_while_unchanged(result, tmp_path):
    """Several results get an index README.md, recorded in the output folder's marker; a rerun rewrites
    it, an edited one is refused."""
    out = tmp_path / "out"
    write_results([("a", result), ("b", result)], out, figures=False)
    assert "[b](b/report.md)" in (out / "README.md").read_text()
    assert "README.md" in json.loads((out / MARKER).read_text())["files"]
    write_results([("a", result), ("b", result)], out, figures=False)
    (out / "README.md").write_text("# mine\n")
    with pytest.raises(OutputFolderError, match="README.md"):
        write_results([("a", result), ("b", result)], out, figures=False)
    assert (out / "README.md").read_text() == "# mine\n"
    write_results([("a", result)], out, figures=False)  # one result: no index, README.md untouched
    assert (out / "README.md").read_text() == "# mine\n"


def test_model_folders_never_receive_results(result, tmp_path):
    """An output folder that is, or lies inside, an analysed model's folder, or that holds a model of
    its own, is refused; so is a result folder that is a model folder."""
    model = _checkpoints.bert(tmp_path / "bert")
    before = _checkpoints.files(model)
    for out in (model, model / "results"):
        with pytest.raises(OutputFolderError, match="model folder"):
            write_results([("x", result)], out, model_dirs=[model])
    with pytest.raises(OutputFolderError, match="model folder"):
        write_results([("x", result)], model)  # holds config.json
    with pytest.raises(OutputFolderError, match="model folder"):
        write_results([("bert", result)], tmp_path, model_dirs=[model])
    assert _checkpoints.files(model) == before


def test_nothing_is_left_behind(result, tmp_path):
    """No staging folder or empty output folder remains; a file in place of the folder is refused."""
    out = tmp_path / "out"
    write_results([("m", result)], out, figures=False)
    assert sorted(p.name for p in out.iterdir()) == ["m"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputFolderError, match="not a folder"):
        write_results([("m", result)], tmp_path / "file")
