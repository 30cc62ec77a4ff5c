"""Fetch the pinned upstream commit of ECG-Expert-QA and check every file against its git blob hash.
"""

from __future__ import annotations

import hashlib
import io
import logging
import shutil
import time
import urllib.request
import zipfile
from pathlib import Path

from utils.data.rows import DataError

log = logging.getLogger(__name__)


# ============================================================================= download
def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\x00" % len(data) + data).hexdigest()


def download(raw_dir: Path, url: str, expected: dict[str, str], timeout: float = 60.0) -> list[Path]:
    """Fetch the pinned upstream archive, keep its JSON data files, verify each against its git blob hash.

    Nothing lands in ``raw_dir`` unless every file in ``expected`` is in the archive and matches.
    """
    raw_dir = Path(raw_dir)
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
    tmp = raw_dir.with_name(raw_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, data in blobs.items():
        (tmp / name).write_bytes(data)
    (tmp / "SOURCE.md").write_text(f"Downloaded from {url} on {time.strftime('%Y-%m-%d')}; "
                                   f"git blob hashes verified.\n")
    if raw_dir.exists():
        shutil.rmtree(raw_dir)
    tmp.rename(raw_dir)
    return [raw_dir / n for n in blobs]
