"""Fetching one file safely: an HTTP download that resumes where it stopped, and checksums.

torchvision.datasets.utils is the model (download_url: urllib with a User-Agent, then
check_integrity: the md5 of the file). It does not resume (a cut 13 GB download starts again from
zero) and it writes the final file name before checking it. Here, with the same standard library
(urllib.request):

* the download goes to `<name>.part` and asks for the missing bytes only (an HTTP `Range: bytes=N-`
  request; a server that ignores it answers 200 and the file is written from the start);
* a transfer that ends before its Content-Length is a cut (http.client returns the short body
  without an error), retried from where it stopped;
* `verify` computes md5 and sha256 in one pass (hashlib, as torchvision's calculate_md5) and the
  `.part` file becomes the file only when every published checksum matches; otherwise it is kept
  aside as `<name>.corrupt` for inspection.
"""
from __future__ import annotations

import hashlib
import os
import re
import socket
import sys
import time
import urllib.error
import urllib.request
from http.client import HTTPException
from pathlib import Path

from preproc._common import PreprocError

USER_AGENT = "vlpl-prepare (python urllib)"
CHUNK = 1 << 20
RETRY_WAIT = 2.0  # seconds before the first retry of an attempt that received nothing; doubled each time
MAX_ATTEMPTS = 1000  # attempts that made progress are not counted against --retries, but are bounded


class FetchError(PreprocError):
    """A file could not be downloaded: `reason` says why, `received` how many bytes are kept."""

    def __init__(self, url: str, reason: str, received: int):
        super().__init__(f"cannot download {url} ({reason})")
        self.url, self.reason, self.received = url, reason, received


def human(num_bytes: int | None) -> str:
    """1234567 -> '1.2 MB' (decimal units, as the archives' sizes are usually given)."""
    if num_bytes is None:
        return "size unknown"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if num_bytes < 1000 or unit == "TB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1000
    raise AssertionError("unreachable")


def progress(total: int | None, label: str, initial: int = 0, disable: bool = False):
    """A byte progress bar on stderr (tqdm)."""
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc=label, unit="B", unit_scale=True, unit_divisor=1000,
                file=sys.stderr, dynamic_ncols=True, leave=False, disable=disable)


def _content_start(response) -> int | None:
    """The first byte a 206 answer carries (its Content-Range), or None if it is unreadable."""
    match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
    return int(match.group(1)) if match else None


def _one_attempt(url: str, part: Path, timeout: float) -> int:
    """Append to `part` what the server sends after its current length; return the bytes received.
    Raises OSError / HTTPException / urllib.error.URLError on a failed or cut transfer."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # nothing after `have`: the file is complete (verify decides)
            return 0
        raise
    with response:
        if have and response.status == 206 and _content_start(response) != have:
            part.unlink()  # a range other than the one asked for: start again on the next attempt
            raise ConnectionError(f"the server sent another range ({response.headers.get('Content-Range')})")
        if have and response.status != 206:
            have = 0  # the server ignored the range and sends the whole file: start again
        length = response.headers.get("Content-Length")
        expected = int(length) if length and length.isdigit() else None
        received = 0
        with open(part, "ab" if have else "wb") as out, \
                progress(have + expected if expected is not None else None, part.name[:-5], have) as bar:
            while chunk := response.read(CHUNK):
                out.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
        if expected is not None and received < expected:
            raise ConnectionError(f"connection closed after {have + received} of {have + expected} bytes")
    return received


def download(url: str, part: Path, *, retries: int = 3, timeout: float = 60.0) -> None:
    """Download url into `part`, resuming from the bytes it already holds. A failed attempt is retried
    (after RETRY_WAIT, doubling) up to `retries` times in a row; attempts that received bytes do not
    count. FetchError when it gives up; `part` keeps what arrived."""
    failures, wait = 0, RETRY_WAIT
    for _ in range(MAX_ATTEMPTS):
        before = part.stat().st_size if part.exists() else 0
        try:
            _one_attempt(url, part, timeout)
            return
        except urllib.error.HTTPError as err:
            if err.code in (401, 403, 404, 410):  # the file is not (or no longer) there: retrying won't help
                raise FetchError(url, f"HTTP {err.code} {err.reason}", before) from None
            reason = f"HTTP {err.code} {err.reason}"
        except urllib.error.URLError as err:
            reason = str(err.reason)
        except (OSError, HTTPException, socket.timeout) as err:
            reason = str(err) or type(err).__name__
        now = part.stat().st_size if part.exists() else 0
        if now > before:  # progress: try again at once
            failures, wait = 0, RETRY_WAIT
            continue
        failures += 1
        if failures > retries:
            raise FetchError(url, reason, now)
        time.sleep(wait)
        wait *= 2
    raise FetchError(url, f"gave up after {MAX_ATTEMPTS} attempts", part.stat().st_size if part.exists() else 0)


def digests(path: Path, label: str | None = None) -> dict[str, str]:
    """{'md5': ..., 'sha256': ...} of a file, read once; a progress bar when label is given."""
    md5, sha256 = hashlib.md5(usedforsecurity=False), hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f, progress(size, label or path.name, disable=label is None) as bar:
        while block := f.read(CHUNK):
            md5.update(block)
            sha256.update(block)
            bar.update(len(block))
    return {"md5": md5.hexdigest(), "sha256": sha256.hexdigest()}


def mismatch(found: dict[str, str], size: int, expected: dict[str, str], expected_size: int | None) -> str | None:
    """The first difference between a file and what was published, as words, or None."""
    if expected_size is not None and size != expected_size:
        return f"size {size} bytes, expected {expected_size}"
    for algo, value in expected.items():
        if found.get(algo) != value.lower():
            return f"{algo} {found.get(algo)}, expected {value.lower()}"
    return None


def file_record(path: Path, found: dict[str, str]) -> dict:
    """What a stamp keeps of a checked file: its checksums, size and modification time (a later run
    trusts the file without re-reading it while size and time are unchanged)."""
    stat = path.stat()
    return {**found, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def unchanged(path: Path, record: dict | None) -> bool:
    """True if path still has the size and modification time a file_record noted."""
    try:
        stat = path.stat()
    except OSError:
        return False
    return bool(record) and stat.st_size == record.get("size") and stat.st_mtime_ns == record.get("mtime_ns")


def accept(part: Path, final: Path, expected: dict[str, str], expected_size: int | None) -> dict:
    """Check a finished download and move it to `final`; on a mismatch keep it as `<final>.corrupt`
    and raise one line (expected and found checksum, where the file is)."""
    found = digests(part, f"checking {final.name}")
    wrong = mismatch(found, part.stat().st_size, expected, expected_size)
    if wrong:
        kept = final.with_name(final.name + ".corrupt")
        os.replace(part, kept)
        raise PreprocError(f"{final.name} failed its check ({wrong}): kept as {kept} for inspection, nothing "
                           f"extracted; delete it and run again, or fetch the file another way (--from-dir)")
    os.replace(part, final)
    return file_record(final, found)
