"""Build the offline demo: synthetic multi-label images and a tiny CLIP trained on them.

Everything is generated from one integer seed, so a fresh clone needs no download:

* ``<data_root>/demo/images/{train,val}/NNNNN.png``: the pictures of preproc/demo_scenes.py
  (streams 0 and 1).
* ``formatted_{train,val}_{images,labels,labels_obs}.npy`` in the layout of every other dataset
  (docs/original-vlpl.md section 2); observed labels come from ``generate_observed(labels, 1, 0, 1200)``.
  ``demo_manifest.json`` stamps them: generator version, seed, sizes, generator parameters and
  the sha256 of every file, so an older or damaged demo is found by content and rebuilt.
* ``clip/vlpl-demo-tiny.pt``: the state dict of the tiny CLIP of preproc/demo_clip.py (open_clip
  model ``preproc/clip_configs/vlpl-demo-tiny.json``); stamp ``clip/vlpl-demo-tiny.json``.

``ensure_demo`` builds what is missing, stale or damaged; main_clip.py calls it for ``-d demo``.

    python preproc/make_demo.py --data-root data --seed 0 [--force]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from preproc._common import PreprocError, run_cli, save_arrays  # noqa: E402
from config import number  # noqa: E402
from files import atomic_write  # noqa: E402
from preproc.demo_clip import (CAPTION_FULL_AREA, CLIP_CONFIG_PATH, DEFAULT_EPOCHS, DEFAULT_PAIRS,  # noqa: E402
                               DEMO_CLIP_CONFIG, train_demo_clip)
from preproc.demo_scenes import (CLIP_NUM_OBJECTS_P, DEMO_CLASSES, DISTRACTOR_RADIUS, DISTRACTORS,  # noqa: E402
                                 IMAGE_SIZE, MIN_VISIBLE, NUM_CLASSES, NUM_OBJECTS_P, NUM_SCENES, RADIUS_RANGE,
                                 SCENE_P, STREAM_TRAIN, STREAM_VAL, iter_pictures)
from preproc.generate_observed_labels import generate_observed  # noqa: E402

OBSERVED_SEED = 1200  # the seed every dataset's observed labels use (docs/original-vlpl.md section 3)

# Bump when the pictures, captions or training recipe change, so cached demos are rebuilt.
GENERATOR_VERSION = 2

DEFAULT_SIZES = dict(num_train=2400, num_test=800, num_clip_pairs=DEFAULT_PAIRS, clip_epochs=DEFAULT_EPOCHS)


# --------------------------------------------------------------------------- files

def _save_json(path: Path, obj: dict) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def _read_json(path: Path) -> dict | None:
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _images_sha256(images_dir: Path, names) -> str:
    """One sha256 over the listed pictures (name, then bytes, in order); ValueError if one is missing."""
    digest = hashlib.sha256()
    for name in names:
        digest.update(str(name).encode() + b"\0")
        try:
            digest.update((images_dir / name).read_bytes())
        except OSError:
            raise ValueError(f"images/{name} is missing or unreadable") from None
    return digest.hexdigest()


def generator_parameters() -> dict:
    """What the pictures depend on besides the seed and the sizes; recorded in both stamps."""
    return dict(image_size=IMAGE_SIZE, classes=DEMO_CLASSES, num_scenes=NUM_SCENES,
                scene_p=SCENE_P, num_objects_p=list(NUM_OBJECTS_P),
                clip_num_objects_p=list(CLIP_NUM_OBJECTS_P), radius_range=list(RADIUS_RANGE),
                min_visible=MIN_VISIBLE, distractors=list(DISTRACTORS),
                distractor_radius=list(DISTRACTOR_RADIUS), caption_full_area=CAPTION_FULL_AREA)


def _settings_problem(found: dict | None, expected: dict) -> str | None:
    """Why a stamp does not describe what would be built now (None: it does)."""
    if found is None:
        return "its stamp is missing or unreadable"
    if found.get("version") != expected["version"]:
        return (f"it was made by generator version {found.get('version')}, "
                f"this is version {expected['version']}")
    changed = sorted(key for key in expected if found.get(key) != expected[key])
    if changed:
        return f"it was made with other settings ({', '.join(changed)})"
    return None


DATA_STAMP = "demo_manifest.json"
_PHASES = (("train", STREAM_TRAIN, "num_train"), ("val", STREAM_VAL, "num_test"))
_NPY_FILES = [f"formatted_{phase}_{kind}.npy" for phase, _, _ in _PHASES
              for kind in ("images", "labels", "labels_obs")]


def data_problem(demo_dir: Path, expected: dict) -> str | None:
    """Why the dataset in ``demo_dir`` cannot be used as it is, in a few words (None: it can).

    Checks the content, not only the presence: the stamp must match ``expected`` (version, seed,
    sizes, generator parameters), and every npy file and the pictures it lists must have the
    sha256 the stamp recorded when they were written (a truncated or edited file fails).
    """
    stamp = _read_json(demo_dir / DATA_STAMP)
    problem = _settings_problem(stamp, expected)
    if problem:
        return problem
    files = stamp.get("sha256")
    if not isinstance(files, dict) or sorted(files) != sorted(_NPY_FILES):
        return f"its stamp {DATA_STAMP} is damaged"
    for name in _NPY_FILES:
        path = demo_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if _sha256(path) != files[name]:
            return f"{name} is damaged (its content differs from the stamp)"
    try:
        names = [str(p) for phase, _, _ in _PHASES
                 for p in np.load(demo_dir / f"formatted_{phase}_images.npy", allow_pickle=False)]
        if _images_sha256(demo_dir / "images", names) != stamp.get("images_sha256"):
            return "a picture under images/ is damaged (its content differs from the stamp)"
    except ValueError as err:
        return str(err)
    return None


def _write_data(demo_dir: Path, seed: int, sizes: dict, stamp: dict, progress: bool) -> None:
    """Pictures into a temporary folder renamed to images/ at the end, then the npy files, then
    the stamp with their sha256 (written last: an interrupted build has no valid stamp)."""
    demo_dir.mkdir(parents=True, exist_ok=True)
    (demo_dir / DATA_STAMP).unlink(missing_ok=True)
    for stale in demo_dir.glob(".images-*"):  # left behind by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    tmp_dir = demo_dir / f".images-{os.getpid()}"
    tmp_dir.mkdir()
    arrays = {}
    names: list[str] = []
    try:
        for phase, stream, size_key in _PHASES:
            (tmp_dir / phase).mkdir()
            paths = [f"{phase}/{i:05d}.png" for i in range(sizes[size_key])]
            labels = np.zeros((len(paths), NUM_CLASSES))  # float64, as format_*.py write
            for i, pixels, classes, _ in iter_pictures(seed, stream, len(paths), progress=progress,
                                                       desc=f"demo {phase} images"):
                Image.fromarray(pixels, "RGB").save(tmp_dir / paths[i], compress_level=1)
                labels[i, classes] = 1.0
            names += paths
            arrays[f"formatted_{phase}_images.npy"] = np.array(paths)
            arrays[f"formatted_{phase}_labels.npy"] = labels
            arrays[f"formatted_{phase}_labels_obs.npy"] = generate_observed(labels, 1, 0,
                                                                            OBSERVED_SEED)
        final = demo_dir / "images"
        if final.exists():
            old = demo_dir / f".images-old-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp_dir, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp_dir, final)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    save_arrays(demo_dir, arrays)
    _save_json(demo_dir / DATA_STAMP,
               {**stamp, "sha256": {name: _sha256(demo_dir / name) for name in _NPY_FILES},
                "images_sha256": _images_sha256(demo_dir / "images", names)})


def clip_problem(checkpoint: Path, expected: dict) -> str | None:
    """Why the tiny-CLIP checkpoint cannot be used as it is (None: it can): its stamp
    (``<checkpoint>.json``) must match ``expected`` and record the checkpoint's sha256."""
    stamp = _read_json(checkpoint.with_suffix(".json"))
    problem = _settings_problem(stamp, expected)
    if problem:
        return problem
    if not checkpoint.is_file():
        return f"{checkpoint.name} is missing"
    if _sha256(checkpoint) != stamp.get("sha256"):
        return f"{checkpoint.name} is damaged (its content differs from the stamp)"
    return None


def _save_state_dict(path: Path, model) -> None:
    import torch

    atomic_write(path, lambda f: torch.save(model.state_dict(), f))


def ensure_demo(data_root: str | Path = "data", *, seed: int = 0, progress: bool = True,
                force: bool = False, num_train: int = DEFAULT_SIZES["num_train"],
                num_test: int = DEFAULT_SIZES["num_test"],
                num_clip_pairs: int = DEFAULT_SIZES["num_clip_pairs"],
                clip_epochs: int = DEFAULT_SIZES["clip_epochs"],
                report: Callable[[str], None] | None = print, with_clip: bool = True) -> Path:
    """Create what is missing, stale or damaged in ``<data_root>/demo/``; return the CLIP checkpoint.

    Two independent artefacts, each with a json stamp of what produced it (generator version,
    seed, sizes, parameters) and the sha256 of what it wrote: the dataset (images/ + six npy
    files, stamp ``demo_manifest.json``) and the tiny CLIP (``clip/vlpl-demo-tiny.pt``, stamp
    ``clip/vlpl-demo-tiny.json``, which also holds the model config). An artefact is rebuilt when
    ``data_problem`` / ``clip_problem`` find a reason, or with ``force``; ``report`` (if given)
    gets one line saying what is built and why. Otherwise nothing is written. Each file appears
    atomically (temporary name + os.replace). ``with_clip=False``: the dataset only (a run that uses
    no CLIP, or --evaluate, whose checkpoint holds its model); the CLIP is left as it is.
    """
    for name, value in (("num_train", num_train), ("num_test", num_test),
                        ("num_clip_pairs", num_clip_pairs), ("clip_epochs", clip_epochs)):
        if int(value) < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    say = report or (lambda line: None)
    demo_dir = Path(data_root) / "demo"
    first_use = not (demo_dir / DATA_STAMP).exists() and not any(
        (demo_dir / name).exists() for name in _NPY_FILES)
    sizes = dict(num_train=int(num_train), num_test=int(num_test))
    data_stamp = dict(version=GENERATOR_VERSION, seed=int(seed), **sizes, **generator_parameters())
    problem = "--force" if force else data_problem(demo_dir, data_stamp)
    if problem:
        say(f"Generating the demo dataset in {demo_dir} (first use)" if first_use else
            f"Regenerating the demo dataset in {demo_dir}: {problem}")
        _write_data(demo_dir, int(seed), sizes, data_stamp, progress)

    checkpoint = demo_dir / "clip" / f"{DEMO_CLIP_CONFIG}.pt"
    if not with_clip:
        return checkpoint
    clip_stamp = dict(version=GENERATOR_VERSION, seed=int(seed),
                      num_clip_pairs=int(num_clip_pairs), clip_epochs=int(clip_epochs),
                      model_config=json.loads(CLIP_CONFIG_PATH.read_text()),
                      **generator_parameters())
    problem = "--force" if force else clip_problem(checkpoint, clip_stamp)
    if problem:
        say(f"Training the demo's tiny CLIP -> {checkpoint} (first use)" if first_use else
            f"Retraining the demo's tiny CLIP {checkpoint}: {problem}")
        checkpoint.with_suffix(".json").unlink(missing_ok=True)
        model, _ = train_demo_clip(int(seed), num_pairs=int(num_clip_pairs),
                                   epochs=int(clip_epochs), progress=progress)
        _save_state_dict(checkpoint, model)
        _save_json(checkpoint.with_suffix(".json"), {**clip_stamp, "sha256": _sha256(checkpoint)})
    return checkpoint


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="make_demo.py",
        description="Generate the synthetic demo dataset and train its tiny CLIP "
                    "(creates only what is missing or stale).")
    parser.add_argument("--data-root", default="data",
                        help="folder that holds the <dataset>/ folders; writes <data-root>/demo/ "
                             "(default: %(default)s)")
    parser.add_argument("--seed", type=number(int, low=0, high=2 ** 32 - 1), default=0,
                        help="seed of the pictures, captions and CLIP training "
                             "(default: %(default)s)")
    parser.add_argument("--force", action="store_true",
                        help="rebuild everything even if it is up to date (default: off)")
    parser.add_argument("--num-train", type=_positive_int, default=DEFAULT_SIZES["num_train"],
                        help="pictures in the official train split (default: %(default)s)")
    parser.add_argument("--num-test", type=_positive_int, default=DEFAULT_SIZES["num_test"],
                        help="pictures in the official val (= test) split (default: %(default)s)")
    parser.add_argument("--clip-pairs", type=_positive_int,
                        default=DEFAULT_SIZES["num_clip_pairs"],
                        help="image-caption pairs the tiny CLIP trains on (default: %(default)s)")
    parser.add_argument("--clip-epochs", type=_positive_int, default=DEFAULT_SIZES["clip_epochs"],
                        help="epochs of tiny-CLIP training (default: %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="hide progress bars (default: off)")

    def build(args: argparse.Namespace) -> list[str]:
        demo_dir = Path(args.data_root) / "demo"
        try:
            checkpoint = ensure_demo(args.data_root, seed=args.seed, progress=not args.quiet,
                                     force=args.force, num_train=args.num_train,
                                     num_test=args.num_test, num_clip_pairs=args.clip_pairs,
                                     clip_epochs=args.clip_epochs)
        except OSError as err:
            raise PreprocError(f"cannot write the demo into {demo_dir}: {err.strerror or err} "
                               f"(check --data-root)") from None
        return [f"demo ready in {demo_dir}; tiny CLIP checkpoint: {checkpoint}"]

    return run_cli(parser, build, argv)


if __name__ == "__main__":
    sys.exit(main())
