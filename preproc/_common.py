"""Helpers shared by the preproc/ command-line scripts: errors, argument parsing, reading text
tables with line numbers, and atomic saving of the formatted arrays."""
from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from files import replace_all

CLASSNAMES_DIR = Path(__file__).resolve().parents[1] / "text_features"


class PreprocError(Exception):
    """A user-facing, one-line error: names the file and what to do about it."""


def check_class_names(dataset: str, names: list[str], source: Path, what_to_do: str) -> None:
    """Refuse (PreprocError, one line) columns whose class names are not, in order, the lines of
    text_features/<dataset>_classnames.txt: that file names column k for CLIP's prompts, the
    pseudo-labels and every report, so a column written in another order, renamed or added would be
    trained and evaluated as another class. `names`: the names the raw file gives the columns, in
    the order they are written; `source`: that file."""
    path = CLASSNAMES_DIR / f"{dataset}_classnames.txt"
    expected = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if names == expected:
        return
    if len(names) != len(expected):
        extra = [n for n in names if n not in expected][:1] or [n for n in expected if n not in names][:1]
        raise PreprocError(f"{source} lists {len(names)} classes, but {dataset} has the {len(expected)} of {path} "
                           f"(e.g. {extra[0]!r} is in one of them only): {what_to_do}")
    k = next(k for k, (name, known) in enumerate(zip(names, expected)) if name != known)
    how = "lists the classes in another order" if sorted(names) == sorted(expected) else "names a class differently"
    raise PreprocError(f"{source} {how}: its class {k} is {names[k]!r}, where line {k + 1} of {path} says "
                       f"{expected[k]!r}: {what_to_do}")


def dataset_parser(prog: str, dataset: str, description: str) -> argparse.ArgumentParser:
    """Parser with the --load-path and --save-path flags every format_<dataset>.py script takes."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    default = f"data/{dataset}"
    parser.add_argument("--load-path", default=default,
                        help=f"folder holding the extracted raw download (default: {default})")
    parser.add_argument("--save-path", default=default,
                        help=f"folder the formatted_*.npy files are written to (default: {default})")
    return parser


def add_missing_images_flag(parser: argparse.ArgumentParser, images: str) -> None:
    """--missing-images drop|error (default drop), for `images` (e.g. 'listed images absent under Flickr/')."""
    parser.add_argument("--missing-images", choices=("drop", "error"), default="drop",
                        help=f"{images}: 'drop' leaves them out and reports how many, 'error' refuses to "
                             "write anything (default: drop)")


def run_cli(parser: argparse.ArgumentParser, body: Callable[[argparse.Namespace], list[str]],
            argv: list[str] | None, errors: tuple[type[Exception], ...] = (PreprocError,)) -> int:
    """Parse argv and print the report lines body(args) returns (exit status 0); an error of a
    type in `errors`, or an OSError (a path in the way, a full disk), becomes one line on stderr
    and exit status 2."""
    args = parser.parse_args(argv)
    try:
        report = body(args)
    except (*errors, OSError) as err:
        message = os_error_line(err) if isinstance(err, OSError) else " ".join(str(err).split("\n"))
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        return 2
    print("\n".join(report))
    return 0


def os_error_line(err: OSError) -> str:
    """'PATH: reason: what to do' of an OSError (os.replace names its target second)."""
    path = err.filename2 or err.filename
    reason = err.strerror or " ".join(str(err).split())
    return (f"{path}: {reason}" if path else reason) + (": check that path (a file where a folder belongs, "
                                                        "or a folder where a file does; permissions; free space)")


def require(path: Path, what_to_do: str) -> Path:
    """Return path if it exists, else fail with a message naming it and what to do."""
    if not path.exists():
        raise PreprocError(f"{path} not found: {what_to_do}")
    return path


def read_rows(path: Path, min_fields: int, max_fields: int | None = None) -> Iterator[tuple[int, list[str]]]:
    """Yield (line number, whitespace-separated fields) for each non-blank line of a text file.

    Any run of spaces or tabs separates fields and Windows line ends are accepted. A line with
    fewer than min_fields (or more than max_fields) fields is an error naming file and line.
    """
    try:
        with open(path, encoding="utf-8-sig") as f:
            for lineno, line in enumerate(f, start=1):
                fields = line.split()
                if not fields:
                    continue
                if len(fields) < min_fields or (max_fields is not None and len(fields) > max_fields):
                    expected = (f"{min_fields}" if max_fields == min_fields
                                else f"at least {min_fields}" if max_fields is None
                                else f"{min_fields} to {max_fields}")
                    raise PreprocError(f"{path}:{lineno}: malformed line {line.strip()[:80]!r} "
                                       f"(expected {expected} fields)")
                yield lineno, fields
    except UnicodeDecodeError as err:
        raise PreprocError(f"{path} is not a text file ({err.reason})") from None
    except OSError as err:
        raise PreprocError(f"cannot read {path}: {err.strerror or err}") from None


def parse_int(path: Path, lineno: int, text: str, allowed: set[int] | None = None) -> int:
    """int(text), or an error naming file and line when it is not an (allowed) integer."""
    try:
        value = int(text)
    except ValueError:
        raise PreprocError(f"{path}:{lineno}: {text!r} is not an integer") from None
    if allowed is not None and value not in allowed:
        raise PreprocError(f"{path}:{lineno}: value {value} is not one of {sorted(allowed)}")
    return value


def save_arrays(folder: Path, arrays: dict[str, np.ndarray]) -> None:
    """Save each array as folder/<name> so that old files stay intact if anything fails.

    Every array is first written to a temporary file in the same folder; only when all of them
    are written are they moved into place (files.replace_all, atomic per file).
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PreprocError(f"cannot create output folder {folder}: {err.strerror or err}") from None
    try:
        replace_all({folder / name: partial(_write_npy, array=array) for name, array in arrays.items()})
    except OSError as err:
        raise PreprocError(f"cannot write {folder}: {err.strerror or err}") from None


def _write_npy(handle, array: np.ndarray) -> None:
    np.save(handle, array, allow_pickle=False)


def save_formatted(folder: Path, phases: dict[str, tuple[list[str], np.ndarray]], sources: dict[str, Path],
                   what_to_do: str) -> list[str]:
    """Save formatted_<phase>_images.npy (unicode array) and formatted_<phase>_labels.npy
    (save_formatted_arrays); return its report lines."""
    arrays = {}
    for phase, (images, labels) in phases.items():
        arrays[f"formatted_{phase}_images.npy"] = np.array(images, dtype=str)
        arrays[f"formatted_{phase}_labels.npy"] = labels
    return save_formatted_arrays(folder, arrays, sources, what_to_do)


# Files of a dataset folder made from its formatted labels (generate_observed_labels.py) or written beside
# them by one format script only (the VOC2007 ignore mask): datasets.load_splits reads them with the labels.
OBSERVED_GLOB = "formatted_*_labels_obs*.npy"
IGNORE_FILES = ("formatted_train_ignore.npy", "formatted_val_ignore.npy")


def save_formatted_arrays(folder: Path, arrays: dict[str, np.ndarray], sources: dict[str, Path],
                          what_to_do: str) -> list[str]:
    """save_arrays, then remove the files the new formatted files make wrong (stale_files); return
    one report line naming them, or none. Formatting the same raw files again removes nothing.

    A phase left without an image (an empty or all-negative annotation file: sources[phase] is the
    file it was read from) is refused before anything is written: it would replace good files with a
    split no run can use."""
    for phase, source in sources.items():
        if len(arrays[f"formatted_{phase}_images.npy"]) == 0:
            raise PreprocError(f"{source} leaves no {phase} image to write (it lists none, or none with a "
                               f"positive label): {what_to_do}; nothing was written to {folder}")
    stale = stale_files(folder, arrays)
    save_arrays(folder, arrays)
    for path in stale:
        try:
            path.unlink(missing_ok=True)
        except OSError as err:
            raise PreprocError(f"cannot remove {path}, made from the earlier formatted files: "
                               f"{err.strerror or err}; remove it by hand") from None
    if not stale:
        return []
    return [f"removed {len(stale)} file(s) of {folder} that belonged to the earlier formatted files: "
            f"{', '.join(p.name for p in stale)} (run preproc/generate_observed_labels.py again for observed labels)"]


def stale_files(folder: Path, arrays: dict[str, np.ndarray]) -> list[Path]:
    """The files of folder that writing `arrays` (formatted_*_{images,labels}.npy) would leave wrong:
    an ignore mask this format does not write, and, when the images or labels change (or were not
    there), every observed-label file, which was sampled from the earlier labels and would be read
    beside the new ones. Such a file contradicting the new labels is refused at load
    (datasets.load_splits), but one that happens to agree would train silently on other samples."""
    stale = [folder / name for name in IGNORE_FILES if name not in arrays and (folder / name).is_file()]
    if any(not _holds(folder / name, array) for name, array in arrays.items() if name not in IGNORE_FILES):
        stale += sorted(folder.glob(OBSERVED_GLOB))
    return stale


def _holds(path: Path, array: np.ndarray) -> bool:
    """Whether path is a numpy file equal to array (shape, values and kind of dtype)."""
    try:
        old = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return False
    return old.shape == array.shape and old.dtype.kind == array.dtype.kind and np.array_equal(old, array)
