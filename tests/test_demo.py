"""Tests of the demo (preproc/make_demo.py, demo_scenes.py, demo_clip.py): the synthetic dataset and its tiny CLIP.

Small sizes throughout (tens of pictures, one short CLIP epoch), except the quality test, which
trains the tiny CLIP at a moderate size and checks its zero-shot pseudo-labels through the same
public path the training script uses (datasets.load_splits -> MultiLabelImages ->
clip_loading.load_clip -> compute_text_features -> PseudoLabeler).
"""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from preproc import demo_clip, demo_scenes, make_demo
from preproc.generate_observed_labels import generate_observed

K = len(demo_scenes.DEMO_CLASSES)
SMALL = dict(num_train=60, num_test=20, num_clip_pairs=64, clip_epochs=1)
NPY_FILES = [f"formatted_{phase}_{kind}.npy" for phase in ("train", "val")
             for kind in ("images", "labels", "labels_obs")]


def snapshot(root: Path) -> dict[str, int]:
    """Relative path -> mtime_ns of every file and folder under root."""
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


def read_pixels(demo_dir: Path, phase: str) -> np.ndarray:
    paths = np.load(demo_dir / f"formatted_{phase}_images.npy")
    return np.stack([np.asarray(Image.open(demo_dir / "images" / p)) for p in paths])


@pytest.fixture(scope="module")
def demos(tmp_path_factory) -> dict[str, Path]:
    """Three small demos: seed 0 twice (in different folders) and seed 1."""
    roots = {}
    for key, seed in (("a", 0), ("b", 0), ("other", 1)):
        root = tmp_path_factory.mktemp(f"demo_{key}")
        make_demo.ensure_demo(root, seed=seed, progress=False, **SMALL)
        roots[key] = root
    return roots


def test_class_names_are_distinct_and_match_the_text_file():
    import class_text_features

    path = Path(make_demo.__file__).resolve().parents[1] / "text_features" / "demo_classnames.txt"
    assert path.read_text(encoding="utf-8").splitlines() == demo_scenes.DEMO_CLASSES
    assert class_text_features.read_classnames("demo") == demo_scenes.DEMO_CLASSES
    assert len(set(demo_scenes.DEMO_CLASSES)) == K == 30
    # Neither the colour nor the shape alone names a class: each belongs to 2 or 3 classes.
    for part in (0, 1):
        counts = Counter(name.split()[part] for name in demo_scenes.DEMO_CLASSES)
        assert len(counts) == 12 and set(counts.values()) <= {2, 3}


def test_generation_is_deterministic_per_seed(demos):
    a, b, other = (demos[k] / "demo" for k in ("a", "b", "other"))
    for name in NPY_FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    for phase in ("train", "val"):
        pixels = read_pixels(a, phase)
        assert np.array_equal(pixels, read_pixels(b, phase))
        assert not np.array_equal(pixels, read_pixels(other, phase))
    assert not np.array_equal(np.load(a / "formatted_train_labels.npy"),
                              np.load(other / "formatted_train_labels.npy"))
    # Training the tiny CLIP is deterministic too.
    clip_a = torch.load(a / "clip" / "vlpl-demo-tiny.pt", weights_only=True)
    clip_b = torch.load(b / "clip" / "vlpl-demo-tiny.pt", weights_only=True)
    assert clip_a.keys() == clip_b.keys()
    assert all(torch.equal(clip_a[k], clip_b[k]) for k in clip_a)


def test_picture_streams_do_not_depend_on_size_and_differ_between_splits():
    few, few_labels = demo_scenes.generate_pictures(3, demo_scenes.STREAM_TRAIN, 4)
    more, more_labels = demo_scenes.generate_pictures(3, demo_scenes.STREAM_TRAIN, 9)
    assert np.array_equal(few, more[:4]) and np.array_equal(few_labels, more_labels[:4])
    for stream in (demo_scenes.STREAM_VAL, demo_scenes.STREAM_CLIP):
        other, _ = demo_scenes.generate_pictures(3, stream, 9)
        assert not any(np.array_equal(x, y) for x in more for y in other)


def test_formatted_files_have_the_dataset_layout(demos):
    demo_dir = demos["a"] / "demo"
    for phase, n in (("train", SMALL["num_train"]), ("val", SMALL["num_test"])):
        images = np.load(demo_dir / f"formatted_{phase}_images.npy")
        labels = np.load(demo_dir / f"formatted_{phase}_labels.npy")
        observed = np.load(demo_dir / f"formatted_{phase}_labels_obs.npy")
        assert images.dtype.kind == "U" and images.shape == (n,)
        assert images[0] == f"{phase}/00000.png" and len(set(images)) == n
        assert labels.shape == observed.shape == (n, K)
        assert set(np.unique(labels)) <= {0.0, 1.0}
        assert labels.sum(axis=1).min() >= 1 and labels.sum(axis=1).max() <= 6
        # Single positive: one +1 per row, on a true positive, nothing else observed.
        assert np.array_equal((observed == 1).sum(axis=1), np.ones(n))
        assert np.all(labels[observed == 1] == 1) and not np.any(observed == -1)
        np.testing.assert_array_equal(observed, generate_observed(labels, 1, 0, 1200))
        with Image.open(demo_dir / "images" / images[-1]) as picture:
            assert picture.size == (64, 64) and picture.mode == "RGB"
        assert len(os.listdir(demo_dir / "images" / phase)) == n


def test_pictures_hold_several_co_occurring_partly_visible_objects():
    _, labels, areas = demo_scenes.generate_pictures(0, demo_scenes.STREAM_TRAIN, 300, with_areas=True)
    counts = labels.sum(axis=1)
    assert counts.min() >= 1 and counts.max() <= 6
    assert counts.mean() >= 3.0
    assert labels.mean(axis=0).min() > 0.04  # every class is common enough
    # Visible areas: positive exactly on the labels; small objects are frequent.
    assert np.array_equal(areas > 0, labels == 1)
    visible = areas[labels == 1]
    assert np.mean(visible < 60) > 0.25 and visible.max() < 64 * 64
    # Co-occurrence: two classes of the same scene meet more often than two of different scenes.
    scene = np.arange(K) % demo_scenes.NUM_SCENES
    together = labels.T @ labels
    same = scene[:, None] == scene[None, :]
    off_diagonal = ~np.eye(K, dtype=bool)
    assert together[same & off_diagonal].mean() > 3 * together[~same].mean()


def test_render_keeps_every_object_half_visible():
    """Re-render with an id map at 1x: each drawn object keeps >= MIN_VISIBLE of its area."""
    for i in range(40):
        rng = np.random.default_rng([0, 0, i])
        picture, classes, areas = demo_scenes.render_picture(rng)
        assert picture.shape == (64, 64, 3) and picture.dtype == np.uint8
        assert len(classes) == len(set(classes)) == len(areas) >= 1
        for k, area in zip(classes, areas):
            # An object covers at least half of the smallest disc of RADIUS_RANGE.
            shape = demo_scenes._SHAPES[demo_scenes._CLASS_PARTS[k][1]]
            r = demo_scenes.RADIUS_RANGE[0] * demo_scenes._SUPERSAMPLE
            mask, _, _ = demo_scenes._mask(shape, 100.0, 100.0, r, 0.0)
            assert area >= demo_scenes.MIN_VISIBLE * mask.sum() / 16 - 1e-6


def test_captions_name_the_largest_object_and_only_objects_of_the_picture():
    rng = np.random.default_rng(0)
    names = ["red circle", "blue square", "green triangle", "navy star"]
    areas = [20.0, 200.0, 3.0, 40.0]
    named = Counter()
    for _ in range(400):
        caption = demo_clip.make_caption(names, areas, rng)
        assert "blue square" in caption
        assert not any(other in caption for other in demo_scenes.DEMO_CLASSES if other not in names)
        named.update(name for name in names if name in caption)
    # Smaller visible area, named less often: 200 px always, 3 px about a quarter of the time.
    assert named["blue square"] == 400 > named["navy star"] > named["red circle"] > named["green triangle"]
    assert 0.1 < named["green triangle"] / 400 < 0.35
    assert demo_clip.make_caption(["red circle"], [10.0], rng) in {
        t.format(v) for t in demo_clip._CAPTION_TEMPLATES for v in ("red circle", "a red circle")}


def test_load_splits_reads_the_demo(demos):
    import datasets

    splits = datasets.load_splits(demos["a"], "demo")
    assert len(splits["train"]) + len(splits["val"]) == SMALL["num_train"]
    assert len(splits["test"]) == SMALL["num_test"]
    train = splits["train"]
    assert np.array_equal((train.labels_obs == 1).sum(axis=1), np.ones(len(train)))


def test_ensure_demo_is_idempotent_and_rebuilds_only_what_changed(tmp_path):
    checkpoint = make_demo.ensure_demo(tmp_path, seed=0, progress=False, **SMALL)
    assert checkpoint == tmp_path / "demo" / "clip" / "vlpl-demo-tiny.pt"
    before = snapshot(tmp_path)
    assert make_demo.ensure_demo(tmp_path, seed=0, progress=False, **SMALL) == checkpoint
    assert snapshot(tmp_path) == before  # nothing written, nothing left behind

    # A new test-split size rebuilds the dataset but keeps the CLIP checkpoint.
    make_demo.ensure_demo(tmp_path, seed=0, progress=False, **{**SMALL, "num_test": 7})
    after = snapshot(tmp_path)
    assert np.load(tmp_path / "demo" / "formatted_val_labels.npy").shape == (7, K)
    assert len(os.listdir(tmp_path / "demo" / "images" / "val")) == 7
    assert after["demo/clip/vlpl-demo-tiny.pt"] == before["demo/clip/vlpl-demo-tiny.pt"]
    assert not [name for name in after if Path(name).name.startswith(".")]  # no temporary files

    # A deleted file is recreated; a new seed rebuilds everything.
    (tmp_path / "demo" / "formatted_train_labels_obs.npy").unlink()
    make_demo.ensure_demo(tmp_path, seed=0, progress=False, **{**SMALL, "num_test": 7})
    assert (tmp_path / "demo" / "formatted_train_labels_obs.npy").is_file()
    labels_file = tmp_path / "demo" / "formatted_train_labels.npy"
    old_labels, old_weights = np.load(labels_file), torch.load(checkpoint, weights_only=True)
    make_demo.ensure_demo(tmp_path, seed=5, progress=False, **SMALL)
    new_weights = torch.load(checkpoint, weights_only=True)
    assert not all(torch.equal(old_weights[k], new_weights[k]) for k in old_weights)
    assert not np.array_equal(np.load(labels_file), old_labels)

    # force rebuilds what is up to date.
    stamp = snapshot(tmp_path)
    make_demo.ensure_demo(tmp_path, seed=5, progress=False, force=True, **SMALL)
    forced = snapshot(tmp_path)
    assert forced["demo/demo_manifest.json"] != stamp["demo/demo_manifest.json"]
    assert forced["demo/clip/vlpl-demo-tiny.pt"] != stamp["demo/clip/vlpl-demo-tiny.pt"]


def test_old_or_damaged_demo_is_detected_by_content_and_rebuilt_with_one_line(tmp_path):
    demo_dir = tmp_path / "demo"
    lines: list[str] = []
    checkpoint = make_demo.ensure_demo(tmp_path, seed=0, progress=False, report=lines.append,
                                       **SMALL)
    assert len(lines) == 2 and all("(first use)" in line for line in lines)
    originals = {name: (demo_dir / name).read_bytes() for name in NPY_FILES}
    stamp = json.loads((demo_dir / "demo_manifest.json").read_text())
    assert stamp["version"] == make_demo.GENERATOR_VERSION and stamp["num_train"] == 60
    assert stamp["classes"] == demo_scenes.DEMO_CLASSES and len(stamp["sha256"]) == 6

    def rebuild() -> str:
        lines.clear()
        make_demo.ensure_demo(tmp_path, seed=0, progress=False, report=lines.append, **SMALL)
        assert len(lines) <= 1 and all("\n" not in line for line in lines)
        return lines[0] if lines else ""

    assert rebuild() == ""  # intact: nothing to say, nothing written

    # A truncated npy file (still present) is found by its content.
    labels = demo_dir / "formatted_train_labels.npy"
    labels.write_bytes(labels.read_bytes()[:200])
    line = rebuild()
    assert line.startswith("Regenerating the demo dataset") and "formatted_train_labels.npy" in line
    assert all((demo_dir / name).read_bytes() == originals[name] for name in NPY_FILES)

    # A damaged picture.
    picture = demo_dir / "images" / "val" / "00003.png"
    picture.write_bytes(picture.read_bytes()[:-10])
    assert "images/" in rebuild()
    # A demo written by an older generator version.
    old = {**stamp, "version": make_demo.GENERATOR_VERSION - 1}
    (demo_dir / "demo_manifest.json").write_text(json.dumps(old))
    assert f"generator version {make_demo.GENERATOR_VERSION - 1}" in rebuild()
    # An unreadable stamp.
    (demo_dir / "demo_manifest.json").write_text("{not json")
    assert "stamp" in rebuild()
    assert all((demo_dir / name).read_bytes() == originals[name] for name in NPY_FILES)

    # A corrupt or missing CLIP checkpoint is retrained, to the same weights.
    weights = checkpoint.read_bytes()
    checkpoint.write_bytes(weights[: len(weights) // 2])
    line = rebuild()
    assert line.startswith("Retraining the demo's tiny CLIP") and "damaged" in line
    saved = torch.load(checkpoint, weights_only=True)
    checkpoint.unlink()
    assert "missing" in rebuild()
    again = torch.load(checkpoint, weights_only=True)
    assert all(torch.equal(saved[k], again[k]) for k in saved)
    assert rebuild() == ""


def test_checkpoint_loads_through_load_clip(demos):
    import class_text_features
    import clip_loading

    checkpoint = demos["a"] / "demo" / "clip" / "vlpl-demo-tiny.pt"
    model, tokenizer = clip_loading.load_clip(demo_clip.DEMO_CLIP_CONFIG, str(checkpoint))
    saved = torch.load(checkpoint, weights_only=True)
    loaded = model.state_dict()
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    assert clip_loading.clip_image_size(model) == demo_scenes.IMAGE_SIZE
    features = class_text_features.compute_text_features(model, tokenizer, demo_scenes.DEMO_CLASSES)
    assert features.shape == (K, model.text_projection.shape[1])


def test_cli_builds_the_demo_and_reports_bad_paths(tmp_path, capsys):
    args = ["--num-train", "12", "--num-test", "5", "--clip-pairs", "16", "--clip-epochs", "1",
            "--quiet"]
    assert make_demo.main(["--data-root", str(tmp_path), *args]) == 0
    assert (tmp_path / "demo" / "clip" / "vlpl-demo-tiny.pt").is_file()
    capsys.readouterr()
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    assert make_demo.main(["--data-root", str(blocker), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("make_demo.py: error:") and "\n" not in err and str(blocker) in err


@pytest.mark.slow  # trains a tiny CLIP: minutes on 2 cores
def test_tiny_clip_pseudo_labels_beat_the_class_prior(tmp_path):
    """Zero-shot pseudo-labels (class name only, temp 0.01, threshold 0.3) on the held-out test
    split of a moderately trained tiny CLIP: precision must be far above the class prior."""
    import class_text_features
    import clip_loading
    import datasets
    import image_dataset
    import pseudo_labeler

    checkpoint = make_demo.ensure_demo(tmp_path, seed=0, progress=False, num_train=10,
                                       num_test=200, num_clip_pairs=1500, clip_epochs=3)
    test = datasets.load_splits(tmp_path, "demo")["test"]
    images = image_dataset.MultiLabelImages(datasets.image_root(tmp_path, "demo"), test,
                                       image_size=demo_scenes.IMAGE_SIZE, train=False)
    batch = torch.stack([images[i]["image"] for i in range(len(images))])
    model, tokenizer = clip_loading.load_clip(demo_clip.DEMO_CLIP_CONFIG, str(checkpoint))
    text_features = class_text_features.compute_text_features(model, tokenizer, demo_scenes.DEMO_CLASSES, "{}")
    labeler = pseudo_labeler.PseudoLabeler(model.visual, text_features, temp=0.01, threshold=0.3)
    positive = labeler(batch).numpy() == 1
    truth = test.labels_true == 1

    prior = truth.mean()
    precision = (positive & truth).sum() / positive.sum()
    assert positive.sum(axis=1).mean() >= 0.5  # it does make pseudo-labels
    assert precision > 2.0 * prior
