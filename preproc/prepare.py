"""Prepare one dataset from its sources: download -> verify -> extract -> format -> observed labels.

    python preproc/prepare.py --dataset pascal|voc2007|coco|cub|nuswide|openimages [--data-root data]
                              [--from-dir DIR] [--mirror BASE_URL]

The dataset's row in preproc/dataset_sources.py (RECIPES) names its files, their URLs and published
checksums, the paths each one provides, the format script and whether observed labels are sampled.
A plan is printed first (what is fetched, from where, how many bytes, where it goes), the free disk
space is checked against it, then each step runs unless its output is already there and valid:

* a source is done when data/<dataset>/prepare_stamp.json records it with the published checksums
  and the paths it provides exist; a verified archive still in data/<dataset>/downloads/ is
  extracted again without downloading when its paths are gone;
* the format step is done when the stamp records the same inputs (each source's sha256, the format
  script's own sha256, its arguments) and every output file still has the size and modification
  time noted with its sha256; the observed-label step likewise (the formatted labels' sha256).

Downloads resume and are checked before use (preproc/fetch.py); archives are checked member by
member and extracted through a staging folder (preproc/archives.py). --from-dir DIR takes every
file from DIR instead (no network): an archive or plain file of the source's name is checked like a
download; a folder already holding the paths a source provides is linked as it is (unverified, and
said so). Sources without a public download (NUS-WIDE, OpenImages' images) come only that way; the
command says how to obtain them. --mirror BASE_URL fetches every file as BASE_URL/<file name>, with
the same checksums. A second run with nothing to do says so and touches nothing. The observed-label
step never replaces a file of other observed labels (one sampled with another --seed, say) unless
--overwrite-observed is given: runs trained on it could no longer be resumed.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import os
import shutil
import sys
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as `python preproc/prepare.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from files import save_json
from preproc._common import PreprocError, run_cli
from preproc.archives import STAGING_SUFFIX, extract, link_folder, place_file
from preproc.dataset_sources import RECIPES, Recipe, Source
from preproc.fetch import (FetchError, accept, digests, download, file_record, human, mismatch, unchanged)

STAMP = "prepare_stamp.json"
STAMP_VERSION = 1
DOWNLOADS = "downloads"
PREPROC = Path(__file__).resolve().parent


# ------------------------------------------------------------------------------------------ stamp

def read_stamp(folder: Path, dataset: str) -> dict:
    import json
    empty = {"version": STAMP_VERSION, "dataset": dataset, "sources": {}}
    try:
        stamp = json.loads((folder / STAMP).read_text())
    except (OSError, ValueError):
        return empty
    if not isinstance(stamp, dict) or stamp.get("version") != STAMP_VERSION or stamp.get("dataset") != dataset:
        return empty
    stamp.setdefault("sources", {})
    return stamp


def write_stamp(folder: Path, stamp: dict) -> None:
    save_json(folder / STAMP, stamp)


# ------------------------------------------------------------------------------------------ plan

@dataclass
class Step:
    """What happens to one source: done, extract (verified archive kept), download, local (an
    archive or file in --from-dir), link (a folder in --from-dir) or missing."""
    source: Source
    action: str
    path: Path | None = None  # the archive/file to use, or the --from-dir folder to link
    fetch_bytes: int = 0
    unpack_bytes: int = 0
    note: str = ""


def provided(source: Source, folder: Path) -> bool:
    return all((folder / rel).exists() for rel in source.provides)


def matches_table(record: dict, source: Source) -> bool:
    """The stamp's checksums of a source are the published ones."""
    return not mismatch(record, record.get("size", -1), source.checksums, source.size)


def source_done(source: Source, record: dict | None, folder: Path) -> bool:
    """The stamp records this source as in place (checked against the published checksums, or a
    folder the user chose) and its paths exist."""
    if not record or not record.get("done") or not provided(source, folder):
        return False
    return bool(record.get("unverified")) or matches_table(record, source)


def url_of(source: Source, mirror: str | None) -> str:
    if mirror:
        return f"{mirror.rstrip('/')}/{urllib.parse.quote(source.name)}"
    return source.url


def plan_step(source: Source, folder: Path, stamp: dict, from_dir: Path | None) -> Step:
    record = stamp["sources"].get(source.name)
    if source_done(source, record, folder):
        return Step(source, "done")
    kept = folder / DOWNLOADS / source.name
    if record and unchanged(kept, record.get("archive")) and matches_table(record, source):
        return Step(source, "extract", kept, unpack_bytes=record["size"])
    if not source.url and provided(source, folder):
        return Step(source, "present")  # the user put it in place by hand
    if from_dir is not None:
        candidate = from_dir / source.name
        if candidate.is_file():
            return Step(source, "local", candidate, unpack_bytes=candidate.stat().st_size)
        if provided(source, from_dir):
            return Step(source, "link", from_dir)
        return Step(source, "missing")
    if not source.url:
        return Step(source, "missing")
    if kept.is_file():
        return Step(source, "local", kept, unpack_bytes=kept.stat().st_size if source.is_archive else 0,
                    note="downloaded earlier, not yet checked")
    part = folder / DOWNLOADS / f"{source.name}.part"
    have = part.stat().st_size if part.exists() else 0
    remaining = max(source.size - have, 0) if source.size is not None else 0
    note = f"resuming at {human(have)}" if have else ""
    if provided(source, folder):  # extracted by hand: unverified, so not taken as done
        note = (f"{', '.join(source.provides)} found without a stamp: fetched again to verify; --from-dir "
                f"{folder} uses them as they are")
    return Step(source, "download", fetch_bytes=remaining,
                unpack_bytes=(source.size or 0) if source.is_archive else 0, note=note)


def _checksum_words(source: Source) -> str:
    if source.checksums:
        return ", ".join(f"{algo} {value}" for algo, value in source.checksums.items())
    return "no published checksum: its sha256 is recorded"


def describe(step: Step, mirror: str | None) -> str:
    source, what = step.source, step.action
    if what == "done":
        return f"  done      {source.name}: verified and in place"
    if what == "present":
        return f"  present   {source.name}: {', '.join(source.provides)} already in place (user-supplied)"
    if what == "extract":
        return f"  extract   {source.name} ({human(source.size)}), verified earlier, from {step.path}"
    if what == "download":
        note = f", {step.note}" if step.note else ""
        return (f"  download  {source.name} ({human(source.size)}{note}) from {url_of(source, mirror)}; "
                f"{_checksum_words(source)}")
    if what == "local":
        note = f" ({step.note})" if step.note else ""
        return f"  use       {step.path}{note}; {_checksum_words(source)}"
    if what == "link":
        tops = sorted({rel.split('/')[0] for rel in source.provides})
        return (f"  link      {', '.join(str(step.path / t) for t in tops)}: used as it is, not verified "
                f"(no archive to check)")
    whose = "user-supplied, see the notes below" if not source.url else "not in --from-dir"
    return f"  missing   {source.name} or a folder with {', '.join(source.provides)} ({whose})"


def format_argv(recipe: Recipe, folder: Path) -> list[str]:
    return [*recipe.format_args, "--load-path", str(folder), "--save-path", str(folder)]


def observed_argv(recipe: Recipe, data_root: Path, overwrite: bool = False) -> list[str]:
    # --overwrite only with --overwrite-observed: a file of other labels may be one the user sampled
    # (another --seed) and trained on; a file of the same labels is left as it is either way
    return ["--dataset", recipe.name, "--data-root", str(data_root), *(["--overwrite"] if overwrite else [])]


def free_space(folder: Path) -> tuple[Path, int]:
    """(the existing folder the data would go to, its free bytes)."""
    existing = folder.resolve()
    while not existing.exists():
        existing = existing.parent
    return existing, shutil.disk_usage(existing).free


# ------------------------------------------------------------------------------------------ sources

def _fetch(step: Step, folder: Path, mirror: str | None, retries: int, timeout: float) -> tuple[Path, dict]:
    """Download (resuming) and check a source; return the checked file and its checksums."""
    source = step.source
    downloads = folder / DOWNLOADS
    downloads.mkdir(parents=True, exist_ok=True)
    part, final = downloads / f"{source.name}.part", downloads / source.name
    url = url_of(source, mirror)
    try:
        download(url, part, retries=retries, timeout=timeout)
    except FetchError as err:
        kept = (f"; the {human(err.received)} received are kept in {part} and the next run resumes"
                if err.received else "")
        other = "" if mirror else ", or fetch it from a mirror with --mirror BASE_URL"
        raise PreprocError(f"cannot download {source.name} from {url} ({err.reason}): put {source.name} "
                           f"({_checksum_words(source)}) in a folder and run again with --from-dir FOLDER"
                           f"{other}{kept}") from None
    return final, {"from": url, **accept(part, final, source.checksums, source.size)}


def _check_local(path: Path, source: Source) -> dict:
    """Check an archive or file given with --from-dir (or left in downloads/) against the table."""
    found = digests(path, f"checking {path.name}")
    wrong = mismatch(found, path.stat().st_size, source.checksums, source.size)
    if wrong:
        raise PreprocError(f"{path} failed its check ({wrong}): not used, nothing extracted; fetch a good "
                           f"copy (or run without --from-dir to download it)")
    return {"from": str(path), **file_record(path, found)}


def _put_in_place(source: Source, path: Path, folder: Path, *, move: bool) -> dict:
    """Extract an archive, or place a plain file; then check that its paths are there."""
    info = extract(path, folder) if source.is_archive else {}
    if not source.is_archive:
        place_file(path, folder / source.name, move=move)
    missing = [rel for rel in source.provides if not (folder / rel).exists()]
    if missing:
        holds = ", ".join(info.get("top", [])) or "other paths"
        raise PreprocError(f"{path} is in place but {folder / missing[0]} is not (the archive holds {holds}): "
                           f"arrange its content as {', '.join(source.provides)} and run again with --from-dir")
    return {"members": info["members"]} if info else {}


def obtain(step: Step, folder: Path, stamp: dict, args) -> None:
    """Run one source's step and record it in the stamp: checked first, then marked done once in place."""
    source = step.source
    if step.action == "link":
        tops = sorted({rel.split("/")[0] for rel in source.provides})
        linked = [link_folder(step.path / top, folder / top) for top in tops]
        print(f"{source.name}: {', '.join(tops)} {'linked from' if any(linked) else 'found in'} {step.path} "
              f"(used as it is, not verified)", flush=True)
        stamp["sources"][source.name] = {"from": f"folder {step.path}", "unverified": True, "done": True}
        return
    if step.action == "download":
        path, checked = _fetch(step, folder, args.mirror, args.retries, args.timeout)
        print(f"{source.name}: downloaded, {_checked_words(source, checked)}", flush=True)
    elif step.action == "extract":
        noted = stamp["sources"][source.name]
        path, checked = step.path, {**noted, **noted["archive"]}
    else:
        path, checked = step.path, _check_local(step.path, source)
        print(f"{step.path}: {_checked_words(source, checked)}", flush=True)
    in_downloads = path.parent == folder / DOWNLOADS
    archive_kept = in_downloads and source.is_archive
    entry = {key: checked[key] for key in ("from", "md5", "sha256", "size")}
    # The checked archive is noted before extracting: a later run extracts it again without fetching.
    entry["archive"] = {key: checked[key] for key in ("size", "mtime_ns")} if archive_kept else None
    stamp["sources"][source.name] = entry
    write_stamp(folder, stamp)
    entry.update(_put_in_place(source, path, folder, move=in_downloads), done=True)
    if archive_kept and args.remove_archives:
        path.unlink()
        entry["archive"] = None
    print(f"{source.name}: {'extracted into' if source.is_archive else 'placed in'} {folder}", flush=True)


def _checked_words(source: Source, checked: dict) -> str:
    if source.checksums:
        return "verified (" + ", ".join(f"{algo} matches" for algo in source.checksums) + ")"
    return f"no published checksum; sha256 {checked['sha256']} recorded"


# ------------------------------------------------------------------------------------------ format and labels

def _sha256(path: Path) -> str:
    return digests(path)["sha256"]


def _tree_fingerprint(paths: list[Path]) -> str:
    """Files, bytes and latest change under unverified sources (files or folders): formatting runs
    again when images are added or a list is edited."""
    files = []
    for top in paths:
        if top.is_file():
            files.append(str(top))
        for root, _, names in os.walk(top, followlinks=True):
            files.extend(os.path.join(root, name) for name in names)
    count = total = latest = 0
    for path in files:
        stat = os.stat(path)
        count, total, latest = count + 1, total + stat.st_size, max(latest, stat.st_mtime_ns)
    return f"{count} files, {total} bytes, latest {latest}"


def _script(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    return Path(spec.origin) if spec and spec.origin else None


def _inputs_of(recipe: Recipe, folder: Path, stamp: dict, script: Path) -> dict:
    """What the format step reads: its script, its arguments (not the folder: the formatted files hold
    relative paths, so a moved --data-root stays formatted) and every source's checksum."""
    inputs = {"script": _sha256(script), "args": list(recipe.format_args)}
    for source in recipe.sources:
        record = stamp["sources"].get(source.name) or {}
        if record.get("sha256") and not record.get("unverified"):
            inputs[source.name] = record["sha256"]
        else:
            inputs[source.name] = _tree_fingerprint([folder / rel.split("/")[0] for rel in source.provides])
    return inputs


def _outputs_valid(folder: Path, record: dict | None, inputs: dict, verify: bool) -> bool:
    if not record or record.get("inputs") != inputs:
        return False
    for name, noted in record.get("outputs", {}).items():
        if not unchanged(folder / name, noted) or (verify and _sha256(folder / name) != noted["sha256"]):
            return False
    return bool(record.get("outputs"))


def _run_script(module: str, argv: list[str]) -> None:
    command = f"python preproc/{module.rsplit('.', 1)[1]}.py {' '.join(argv)}"
    print(f"running {command}", flush=True)
    status = importlib.import_module(module).main(argv)
    if status:
        raise PreprocError(f"`{command}` failed (its error is above); the extracted files are kept: fix the "
                           f"cause and run prepare.py again")


def _record_outputs(folder: Path, names) -> dict:
    return {name: file_record(folder / name, {"sha256": _sha256(folder / name)}) for name in names}


def _sample_observed(recipe: Recipe, args) -> None:
    """generate_observed_labels.py's default sampling (write_single), refusing in one line to replace a
    file of other observed labels without --overwrite-observed."""
    from preproc import generate_observed_labels as observed
    argv = observed_argv(recipe, args.data_root, args.overwrite_observed)
    print(f"running python preproc/generate_observed_labels.py {' '.join(argv)}", flush=True)
    try:
        lines = observed.write_single(args.data_root, recipe.name, overwrite=args.overwrite_observed)
    except observed.OtherObservedLabels as err:
        raise observed.OtherObservedLabels(err.path, "--overwrite-observed") from None
    print("\n".join(lines), flush=True)


def run_step(stamp: dict, key: str, folder: Path, run, inputs: dict, outputs, verify: bool) -> bool:
    """run() (a script's step) unless the stamp shows the same inputs and intact outputs; True if it ran."""
    if _outputs_valid(folder, stamp.get(key), inputs, verify):
        return False
    run()
    stamp[key] = {"inputs": inputs, "outputs": _record_outputs(folder, outputs)}
    write_stamp(folder, stamp)
    return True


def format_pending(recipe: Recipe) -> str | None:
    """Why this checkout cannot format the dataset yet (its format script or its config.DATASETS row
    is missing: voc2007 and openimages arrive with their own changes), or None."""
    from config import DATASETS
    script = f"preproc/{recipe.format_module.rsplit('.', 1)[1]}.py"
    if _script(recipe.format_module) is None:
        return f"formatting needs {script}, which this checkout does not have yet (it is being added)"
    if recipe.name not in DATASETS:
        return (f"formatting needs the {recipe.name} row of config.DATASETS and `{script} "
                f"{' '.join(recipe.format_args)}`, which this checkout does not have yet (they are being added)")
    return None


# ------------------------------------------------------------------------------------------ the command

@contextlib.contextmanager
def locked(folder: Path):
    """One prepare.py at a time per dataset folder (an advisory lock where the system has one)."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not a POSIX system: no lock
        yield
        return
    with open(folder / ".prepare.lock", "a") as handle:  # "a": the file is not rewritten
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise PreprocError(f"another prepare.py is working on {folder}: wait for it to finish") from None
        yield


def print_plan(recipe: Recipe, folder: Path, steps: list[Step], args) -> None:
    print(f"prepare {recipe.name} ({recipe.title}) in {folder}", flush=True)
    for step in steps:
        print(describe(step, args.mirror))
    state = format_pending(recipe) or f"python preproc/{recipe.format_module.rsplit('.', 1)[1]}.py " + " ".join(
        format_argv(recipe, folder))
    print(f"  format    {state}")
    if recipe.observed:
        argv = " ".join(observed_argv(recipe, args.data_root, args.overwrite_observed))
        print(f"  observed  python preproc/generate_observed_labels.py {argv}")
    fetch = sum(s.fetch_bytes for s in steps)
    unpack = sum(s.unpack_bytes for s in steps)
    unknown = [s.source.name for s in steps if s.action == "download" and s.source.size is None]
    if any(s.action == "missing" and not s.source.url for s in steps):
        for line in recipe.user_help:
            print(f"  note      {line}")
    where, free = free_space(folder)
    extra = f" (+ {', '.join(unknown)}: size not published)" if unknown else ""
    print(f"  disk      {human(fetch)} to download{extra}, about {human(unpack)} to unpack; {human(free)} free "
          f"on {where}", flush=True)
    if fetch + unpack > free:
        if args.dry_run:  # the plan is what was asked for; the real run refuses before any download
            print(f"  warning   {where} has {human(free)} free, {human(fetch + unpack)} needed: a real run "
                  f"would stop here", flush=True)
            return
        raise PreprocError(f"{recipe.name} needs about {human(fetch + unpack)} ({human(fetch)} to download, "
                           f"{human(unpack)} to unpack) but {where} has {human(free)} free: free some space or "
                           f"choose another --data-root")


def missing_sources(recipe: Recipe, steps: list[Step], args) -> PreprocError:
    names = [s.source.name for s in steps if s.action == "missing"]
    if any(not s.source.url for s in steps if s.action == "missing"):
        return PreprocError(f"{recipe.name} needs files you supply ({', '.join(names)}): see the instructions "
                            f"printed with the plan")
    return PreprocError(f"{', '.join(names)} not in {args.from_dir}: put {'it' if len(names) == 1 else 'them'} "
                        f"there (archive or extracted folder), or run without --from-dir to download")


def prepare(args) -> list[str]:
    recipe = RECIPES[args.dataset]
    folder = args.data_root / recipe.name
    from_dir = args.from_dir.resolve() if args.from_dir else None
    if from_dir is not None and not from_dir.is_dir():
        raise PreprocError(f"--from-dir {args.from_dir} is not a folder")
    if args.mirror and urllib.parse.urlparse(args.mirror).scheme not in ("http", "https", "ftp", "file"):
        raise PreprocError(f"--mirror {args.mirror} is not a URL: give http://, https://, ftp:// or file://")
    if args.retries < 0 or args.timeout <= 0:
        raise PreprocError("--retries must be >= 0 and --timeout > 0")
    if args.data_root.exists() and not args.data_root.is_dir():
        raise PreprocError(f"--data-root {args.data_root} is a file: name the folder that holds (or will hold) "
                           f"{recipe.name}/")
    if args.dry_run:
        steps = [plan_step(source, folder, read_stamp(folder, recipe.name), from_dir) for source in recipe.sources]
        print_plan(recipe, folder, steps, args)
        return ["dry run: nothing done"]
    with locked(folder):
        for leftover in folder.glob(f".*{STAGING_SUFFIX}"):  # staging folders of a killed run
            shutil.rmtree(leftover, ignore_errors=True)
        stamp = read_stamp(folder, recipe.name)
        steps = [plan_step(source, folder, stamp, from_dir) for source in recipe.sources]
        print_plan(recipe, folder, steps, args)
        did = [step.source.name for step in steps if step.action not in ("done", "present", "missing")]
        for step in steps:
            if step.source.name in did:
                obtain(step, folder, stamp, args)
                write_stamp(folder, stamp)
        if any(step.action == "missing" for step in steps):
            raise missing_sources(recipe, steps, args)
        pending = format_pending(recipe)
        if pending:
            return [f"{recipe.name}: sources ready in {folder}; {pending}"]
        did += format_and_sample(recipe, folder, stamp, args)
    if not did:
        return [f"{recipe.name}: everything is already prepared and unchanged in {folder} (stamp {STAMP}); "
                f"nothing to do"]
    return [f"{recipe.name}: ready in {folder} ({', '.join(did)} done; stamp {STAMP})"]


def format_and_sample(recipe: Recipe, folder: Path, stamp: dict, args) -> list[str]:
    """The format step, then the observed-label step; the names of those that ran."""
    did = []
    inputs = _inputs_of(recipe, folder, stamp, _script(recipe.format_module))
    try:
        if run_step(stamp, "format", folder, lambda: _run_script(recipe.format_module, format_argv(recipe, folder)),
                    inputs, recipe.format_outputs, args.verify):
            did.append("format")
    except PreprocError as err:
        # A source without a published checksum is taken as fetched (e.g. an error page from a mirror): say
        # which, since only deleting it makes the next run fetch it again.
        unchecked = [source for source in recipe.sources if not source.checksums and source.url
                     and stamp["sources"].get(source.name, {}).get("done")]
        if not unchecked:
            raise
        paths = ", ".join(str(folder / rel) for source in unchecked for rel in source.provides)
        raise PreprocError(f"{err}; if a file fetched without a published checksum is damaged (not the "
                           f"official file, e.g. an error page), delete it and run again to fetch it anew: "
                           f"{paths}") from None
    if not recipe.observed:
        return did
    formatted = stamp["format"]["outputs"]
    labels = ("formatted_train_labels.npy", "formatted_val_labels.npy")
    inputs = {"script": _sha256(_script("preproc.generate_observed_labels")),
              **{name: formatted[name]["sha256"] for name in labels}}
    if run_step(stamp, "observed", folder, lambda: _sample_observed(recipe, args), inputs,
                ("formatted_train_labels_obs.npy", "formatted_val_labels_obs.npy"), args.verify):
        did.append("observed labels")
    return did


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prepare.py", description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, choices=sorted(RECIPES),
                        help="the dataset to prepare (its row in preproc/dataset_sources.py)")
    parser.add_argument("--data-root", type=Path, default=Path("data"),
                        help="folder holding one sub-folder per dataset (default: data)")
    parser.add_argument("--from-dir", type=Path, default=None,
                        help="take every file from this folder instead of the network: archives or plain "
                             "files under their published names (checked against the table), or folders "
                             "already extracted (linked, used as they are)")
    parser.add_argument("--mirror", default=None, metavar="BASE_URL",
                        help="fetch every file as BASE_URL/<file name> (a mirror that keeps the file names); "
                             "the same checksums apply")
    parser.add_argument("--retries", type=int, default=3,
                        help="retries of a download attempt that received nothing (default: 3)")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds without an answer before an attempt fails (default: 60)")
    parser.add_argument("--remove-archives", action="store_true",
                        help="delete each downloaded archive once it is extracted (saves its size on disk; a "
                             "later re-extraction then downloads again)")
    parser.add_argument("--verify", action="store_true",
                        help="re-read the formatted files and compare their sha256 with the stamp instead of "
                             "trusting unchanged sizes and times")
    parser.add_argument("--overwrite-observed", action="store_true",
                        help="let the observed-label step replace formatted_{train,val}_labels_obs.npy files that "
                             "hold other labels (sampled with another --seed, edited, or from labels formatted "
                             "before); without it the step stops and names the file. A file that already holds "
                             "the labels the step would write is left as it is")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and stop")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        return run_cli(parser, prepare, argv)
    except KeyboardInterrupt:
        print("prepare.py: interrupted; a partial download is kept and resumes on the next run, nothing half-"
              "extracted is kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
