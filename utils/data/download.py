"""Fetch the pinned upstream commit of ECG-Expert-QA and check every file against its git blob hash.

The folder is written to a temporary sibling and renamed into place with :data:`DOWNLOAD_MARKER`, which
names the archive and the blobs verified. Only a folder carrying that marker (or an empty one) is ever
replaced: a raw folder someone else made, such as a shared copy of the data, is left alone.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
import urllib.request
import zipfile
from pathlib import Path

from utils.core.artifacts import atomic_save, replaceable
from utils.data.rows import DataError

DOWNLOAD_MARKER = ".ecg-grpo-download"  # JSON written by download(): the project made this raw folder
# (no .json suffix: the raw folder's *.json files are the data)

log = logging.getLogger(__name__)


# ============================================================================= download
def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\x00" % len(data) + data).hexdigest()


def check_replaceable_raw(raw_dir: Path) -> None:
    if not replaceable(raw_dir, DOWNLOAD_MARKER):
        raise DataError(f"{raw_dir}: exists and was not made by --download (no {DOWNLOAD_MARKER}), so it is not "
                        "replaced; drop --download to read the files in it, choose another --raw-dir, or remove "
                        "the folder yourself")


def download(raw_dir: Path, url: str, expected: dict[str, str], timeout: float = 60.0) -> list[Path]:
    """Fetch the pinned upstream archive, keep its JSON data files, verify each against its git blob hash.

    Nothing lands in ``raw_dir`` unless every file in ``expected`` is in the archive and matches, and an
    existing ``raw_dir`` is replaced only when an earlier download made it (:data:`DOWNLOAD_MARKER`).
    """
    raw_dir = Path(raw_dir)
    check_replaceable_raw(raw_dir)  # before the network: a refusal costs nothing
    log.info("downloading %s", url)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            payload = resp.read()
    except Exception as e:  # urllib raises several unrelated types for one cause: no data
        raise DataError(f"{url}: download failed ({e}); fetch the archive by hand and unzip it into {raw_dir}") from None
    try:
        zf = zipfile.ZipFile(io.BytesIO(payload))
    except zipfile.BadZipFile:
        raise DataError(f"{url}: the download is not a zip archive ({len(payload)} bytes)") from None
    files = {Path(n).name: n for n in zf.namelist() if n.endswith(".json")}
    missing = [f for f in expected if f not in files]
    if missing:
        raise DataError(f"{url}: archive lacks {missing[0]!r} (and {len(missing) - 1} more)" if len(missing) > 1
                        else f"{url}: archive lacks {missing[0]!r}")
    blobs = {}
    for name, prefix in expected.items():
        data = zf.read(files[name])
        sha = git_blob_sha1(data)
        if not sha.startswith(prefix):
            raise DataError(f"{url}: {name!r} has git blob {sha[:8]}, expected {prefix}: not the pinned commit")
        blobs[name] = data

    def write(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        for name, data in blobs.items():
            (tmp / name).write_bytes(data)
        (tmp / "SOURCE.md").write_text(f"Downloaded from {url} on {time.strftime('%Y-%m-%d')}; "
                                       f"git blob hashes verified.\n")
        marker = {"url": url, "downloaded": time.strftime("%Y-%m-%dT%H:%M:%S"),
                  "git_blobs": {name: git_blob_sha1(data) for name, data in blobs.items()}}
        (tmp / DOWNLOAD_MARKER).write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")

    atomic_save(raw_dir, write)
    log.info("downloaded %d verified files into %s", len(blobs), raw_dir)
    return [raw_dir / n for n in blobs]
