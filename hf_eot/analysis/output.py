"""Writing analysis results (raw results, figures, report) into an output folder without losing anything.

The rules: nothing is written into a model folder; nothing is deleted or overwritten unless this module
wrote it. Each folder it writes holds a marker file (:data:`MARKER`) that lists every file written there
with its SHA-256; an existing result folder (or the index ``README.md``) is replaced only when its
marker proves that every file in it is unchanged since it was written. Anything else is refused with
:class:`OutputFolderError` before a model runs (:func:`check_output_folder`) and checked again just
before writing. Results are written into a staging folder inside the output folder and moved into
place at the end, so a failed run leaves no half-written results.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["MARKER", "OutputFolderError", "check_output_folder", "write_results"]

MARKER = ".hf-eot-analysis.json"
INDEX = "README.md"
#: Files that make a folder a model (or tokenizer) folder.
MODEL_FILES = (
    "config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "tokenizer.json",
    "tokenizer_config.json",
)


class OutputFolderError(ValueError):
    """The output folder cannot take the results without overwriting or deleting something."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_marker(folder: Path) -> dict[str, str] | None:
    """``{relative path: sha256}`` from a folder's marker, or None without a readable marker."""
    try:
        data = json.loads((folder / MARKER).read_text(encoding="utf-8"))
        files = data["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        return None
    return files


def _write_marker(folder: Path, files: dict[str, str]) -> None:
    text = json.dumps({"written_by": "hf-eot analyze", "files": dict(sorted(files.items()))}, indent=1)
    tmp = folder / (MARKER + ".tmp")
    tmp.write_text(text + "\n", encoding="utf-8")
    os.replace(tmp, folder / MARKER)


def _mark(folder: Path) -> None:
    """Writes the marker of a freshly written folder: every file in it with its hash."""
    files = {}
    for root, _dirs, names in os.walk(folder):
        for name in names:
            p = Path(root) / name
            if p.name != MARKER:
                files[p.relative_to(folder).as_posix()] = _sha256(p)
    _write_marker(folder, files)


def _foreign_entry(folder: Path) -> str | None:
    """The first entry of `folder` that its marker does not prove to be ours (None: all ours)."""
    listed = _read_marker(folder)
    if listed is None:
        return "no " + MARKER
    for root, dirs, names in os.walk(folder):
        base = Path(root)
        for d in dirs:
            rel = (base / d).relative_to(folder).as_posix()
            if (base / d).is_symlink() or not any(p == rel or p.startswith(rel + "/") for p in listed):
                return rel + "/"
        for name in names:
            p = base / name
            rel = p.relative_to(folder).as_posix()
            if rel == MARKER:
                continue
            if p.is_symlink() or rel not in listed or _sha256(p) != listed[rel]:
                return rel
    return None


def _is_model_folder(path: Path) -> bool:
    return any((path / name).is_file() for name in MODEL_FILES)


def _can_create_files(folder: Path) -> bool:
    """Whether a file can be created in `folder` (tried: permission bits do not bind root, and
    read-only file systems are not seen by ``os.access``); the probe leaves nothing behind."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def _writable_anchor(out: Path) -> Path:
    """The folder that will hold `out`: `out` itself if it exists, else its nearest existing ancestor."""
    p = out
    while not p.exists():
        p = p.parent
    return p


def check_output_folder(
    out: str | os.PathLike,
    labels: Sequence[str],
    model_dirs: Sequence[str | os.PathLike] = (),
    index: bool = False,
) -> Path:
    """Refuses an output folder that would receive results by overwriting or deleting anything this
    module did not write, or that is (or lies inside) a model folder. Returns the resolved folder.

    Args:
        out: the output folder (created when the results are written).
        labels: the result sub-folders ``out/<label>`` that will be (re)written.
        model_dirs: the folders of the analysed models (nothing may be written into them).
        index: whether ``out/README.md`` (the index of several results) will be written.
    """
    out = Path(out).resolve()
    if out.exists() and not out.is_dir():
        raise OutputFolderError(f"output folder {str(out)!r} exists and is not a folder")
    anchor = _writable_anchor(out)
    if not anchor.is_dir() or not _can_create_files(anchor):
        raise OutputFolderError(f"output folder {str(out)!r}: {str(anchor)!r} is not writable")
    for model in model_dirs:
        model = Path(model).resolve()
        if out == model or model in out.parents:
            raise OutputFolderError(
                f"output folder {str(out)!r} is inside the model folder {str(model)!r}; "
                "results are never written into a model folder"
            )
    if out.exists() and _is_model_folder(out):
        raise OutputFolderError(
            f"output folder {str(out)!r} is a model folder (it holds "
            f"{next(n for n in MODEL_FILES if (out / n).is_file())}); results are never written into one"
        )
    for label in labels:
        target = out / label
        if not target.exists() and not target.is_symlink():
            continue
        if any(target.resolve() == Path(m).resolve() for m in model_dirs):
            raise OutputFolderError(
                f"{str(target)!r} is the model folder of {label}: choose another output folder"
            )
        foreign = _foreign_entry(target) if target.is_dir() and not target.is_symlink() else ""
        if foreign is not None:
            what = f" ({foreign})" if foreign else ""
            raise OutputFolderError(
                f"{str(target)!r} exists and holds files that hf-eot analyze did not write{what}; "
                "choose another output folder or move it away"
            )
    if index and (out / INDEX).exists():
        listed = _read_marker(out) or {}
        readme = out / INDEX
        if readme.is_symlink() or not readme.is_file() or listed.get(INDEX) != _sha256(readme):
            raise OutputFolderError(
                f"{str(readme)!r} exists and was not written by hf-eot analyze (or was edited since); "
                "choose another output folder or move it away"
            )
    return out


def _make_readable(directory: Path) -> None:
    """Files written through temporary names can come out 0600; give them the usual umask mode."""
    umask = os.umask(0)
    os.umask(umask)
    for p in [directory, *directory.rglob("*")]:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)


def _index(results: Sequence[tuple[str, Any]]) -> str:
    lines = ["# hf-eot analyze", ""]
    for label, result in results:
        enc = result.components.get("encoder") or next(iter(result.components.values()))
        dev = enc.values("relative_deviation").double()
        lines.append(
            f"- [{label}]({label}/report.md): {result.meta.get('problems', 0):,} dual problems, "
            f"mean ||lambda* - alpha z|| / ||lambda*|| = {float(dev.mean()):.4f}"
        )
    return "\n".join(lines) + "\n"


def write_results(
    results: Sequence[tuple[str, Any]],
    out: str | os.PathLike,
    *,
    figures: bool = True,
    raw: bool = True,
    model_dirs: Sequence[str | os.PathLike] = (),
) -> list[Path]:
    """Writes each ``(label, AnalysisResult)`` into ``out/<label>/`` (results, figures, report) and, for
    several results, the index ``out/README.md``. Returns the paths of the reports."""
    from .report import write_report

    labels = [label for label, _ in results]
    index = len(results) > 1
    out = check_output_folder(out, labels, model_dirs, index=index)
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".hf-eot-staging-", dir=out))
    except OSError as e:
        raise OutputFolderError(f"cannot write into output folder {str(out)!r}: {e.strerror}") from e
    reports = []
    try:
        for label, result in results:
            d = staging / label
            result.save(d, raw=raw)
            figs = None
            if figures:
                try:
                    from .plots import write_figures

                    figs = write_figures(result, d / "figures")
                except ImportError as e:
                    print(f"warning: no figures ({e})", file=sys.stderr)
            write_report(result, d, figs, raw=raw)
            _mark(d)
            _make_readable(d)
            reports.append(out / label / "report.md")
        if index:
            (staging / INDEX).write_text(_index(results))
        # the folder may have changed while the models ran
        check_output_folder(out, labels, model_dirs, index=index)
        for label in labels:
            _move_into_place(staging / label, out / label, out)
        if index:
            listed = _read_marker(out) or {}
            os.replace(staging / INDEX, out / INDEX)
            listed[INDEX] = _sha256(out / INDEX)
            _write_marker(out, listed)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not any(out.iterdir()):
            out.rmdir()
    return reports


def _move_into_place(new: Path, target: Path, out: Path) -> None:
    """Moves `new` to `target`; an earlier result at `target` (checked to be ours) is removed."""
    if not target.exists():
        os.replace(new, target)
        return
    trash = Path(tempfile.mkdtemp(prefix=".hf-eot-old-", dir=out))
    os.replace(target, trash / target.name)
    os.replace(new, target)
    shutil.rmtree(trash, ignore_errors=True)
