"""Putting a source in place: extracting an archive safely, or placing a plain file or a folder.

Extraction (tar, tar.gz/tgz, zip) follows torchvision.datasets.utils.extract_archive (tarfile /
zipfile by the file's suffix), with three additions:

1. Every member is checked before anything is written, and a bad one stops the extraction with one
   line naming it: an absolute name, a `..` component, a member written through a link of the
   archive, a link whose target leaves the target folder, a device file or FIFO. For tar members
   this includes tarfile.data_filter, the check of Python's extraction filter `filter='data'`
   (PEP 706; in 3.12 and backported to 3.10.12 and 3.11.4), which then also guards the extraction
   itself. zipfile creates no links or devices; its names get the same checks.
2. Members go to a staging folder `<target>/.<archive>.extracting`, whose entries are then moved
   into place (os.replace); an interrupted run leaves the staging folder, which the next run deletes,
   and never a stamped step: prepare.py marks the extraction done only after the move.
3. The space the members need is compared with the free space before extracting.
"""
from __future__ import annotations

import os
import shutil
import tarfile
import zipfile
from pathlib import Path, PurePosixPath, PureWindowsPath

from preproc._common import PreprocError
from preproc.fetch import human, progress

STAGING_SUFFIX = ".extracting"


class ArchiveError(PreprocError):
    """An archive that is refused or cannot be read (one line)."""


def staging_folder(target: Path, archive_name: str) -> Path:
    return target / f".{archive_name}{STAGING_SUFFIX}"


def _name_problem(name: str) -> str | None:
    """Why a member name may not be extracted, or None."""
    if name.startswith(("/", "\\")) or PureWindowsPath(name).drive:
        return "absolute path"
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        return "'..' in its path"
    return None


def _link_on_the_way(path: str, links: set[str]) -> str | None:
    """The first link of the archive that `path` (relative to the target, '..' allowed) goes through."""
    stack: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if stack and "/".join(stack) in links:
            return "/".join(stack)
        if part == "..":
            if stack:
                stack.pop()
        else:
            stack.append(part)
    return None


def _tar_problem(member: tarfile.TarInfo, links: set[str], dest: str) -> str | None:
    """Why a tar member may not be extracted, or None. Nothing may be written or pointed through a
    link of the archive, so every link resolves by its name alone, whatever the links around it."""
    problem = _name_problem(member.name)
    if problem:
        return problem
    through = _link_on_the_way(member.name, links)
    if through:
        return f"written through the link {through!r}"
    if member.issym() or member.islnk():
        base = os.path.dirname(member.name) if member.issym() else ""
        joined = f"{base}/{member.linkname}" if base else member.linkname
        where = os.path.normpath(joined)
        if os.path.isabs(member.linkname) or where == ".." or where.startswith("../"):
            return f"a link to {member.linkname!r}, outside the target folder"
        through = _link_on_the_way(joined, links)
        if through:
            return f"a link to {member.linkname!r}, through the link {through!r}"
    try:
        tarfile.data_filter(member, dest)  # device files, FIFOs, and the filter's own path checks
    except tarfile.FilterError as err:
        return str(err)
    return None


def _checked_tar_members(tar: tarfile.TarFile, archive: Path, dest: Path) -> list[tarfile.TarInfo]:
    members = tar.getmembers()
    links = {m.name.rstrip("/") for m in members if m.issym() or m.islnk()}
    for member in members:
        problem = _tar_problem(member, links, str(dest))
        if problem:
            raise ArchiveError(f"{archive}: member {member.name!r} refused ({problem}); nothing extracted")
    return members


def _checked_zip_members(zf: zipfile.ZipFile, archive: Path) -> list[zipfile.ZipInfo]:
    members = zf.infolist()
    for info in members:
        problem = _name_problem(info.filename)
        if problem:
            raise ArchiveError(f"{archive}: member {info.filename!r} refused ({problem}); nothing extracted")
    return members


def _check_space(archive: Path, target: Path, needed: int) -> None:
    free = shutil.disk_usage(target).free
    if needed > free:
        raise ArchiveError(f"{archive} unpacks to {human(needed)} but {target} has {human(free)} free: "
                           f"free some space and run again")


def _merge(source: Path, target: Path) -> None:
    """Move every entry of source into target; folders present on both sides are merged."""
    for entry in os.scandir(source):
        out = target / entry.name
        if entry.is_dir(follow_symlinks=False) and out.is_dir() and not out.is_symlink():
            _merge(Path(entry.path), out)
            continue
        if out.is_symlink() or out.is_file():
            out.unlink()  # a link placed from --from-dir, or an older file
        elif out.is_dir():
            shutil.rmtree(out)
        os.replace(entry.path, out)


def extract(archive: Path, target: Path) -> dict:
    """Extract archive into target (see the module doc); return {'members': n, 'bytes': total, 'top':
    the names it created at the top of target}."""
    if not hasattr(tarfile, "data_filter"):
        raise ArchiveError("safe extraction needs tarfile's extraction filters: use Python 3.10.12, 3.11.4, "
                           "3.12 or newer")
    target.mkdir(parents=True, exist_ok=True)
    staging = staging_folder(target, archive.name)
    shutil.rmtree(staging, ignore_errors=True)  # left by an interrupted run
    try:
        if archive.name.endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                members = _checked_zip_members(zf, archive)
                total = sum(info.file_size for info in members)
                _check_space(archive, target, total)
                staging.mkdir()
                with progress(total, f"extracting {archive.name}") as bar:
                    for info in members:
                        zf.extract(info, staging)
                        bar.update(info.file_size)
        else:
            with tarfile.open(archive) as tar:  # compression detected from the content
                members = _checked_tar_members(tar, archive, staging)
                total = sum(m.size for m in members)
                _check_space(archive, target, total)
                staging.mkdir()
                with progress(total, f"extracting {archive.name}") as bar:
                    def counted():
                        for member in members:
                            yield member
                            bar.update(member.size)
                    tar.extractall(staging, members=counted(), filter="data")
        top = sorted(os.listdir(staging))
        _merge(staging, target)
    except tarfile.FilterError as err:  # the filter's check at extraction time (links created on disk)
        raise ArchiveError(f"{archive}: member {err.tarinfo.name!r} refused ({err}); nothing extracted") from None
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as err:
        raise ArchiveError(f"{archive} cannot be read as an archive ({err}): fetch it again") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"members": len(members), "bytes": total, "top": top}


def place_file(source: Path, target: Path, *, move: bool) -> None:
    """Put a plain file at target: moved (a download) or copied through a temporary file (the
    user's own file, which stays where it is)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if move:
        os.replace(source, target)
        return
    temporary = target.with_name(f".{target.name}.copying")
    try:
        shutil.copyfile(source, temporary)
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


def link_folder(source: Path, target: Path) -> bool:
    """Make target a symbolic link to the existing folder or file source; False if target already is
    source. A real file or folder at target is never replaced (one line)."""
    source = source.resolve()
    if target.exists() and target.resolve() == source:
        return False
    if target.is_symlink():
        target.unlink()
    elif target.exists():
        raise ArchiveError(f"{target} already exists and is not {source}: move it away, or pass "
                           f"--from-dir {target.parent} to use it as it is")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.symlink_to(source, target_is_directory=source.is_dir())
    return True
