"""What made a run: content hashes of files, the code version, the package versions, and the difference
between two such records.

A run folder and the model folder it produces record a fingerprint (the resolved config, the hash of
each data split read, the base model's identity, the package versions and the code version), so that
``resume: auto`` continues only the very run that stopped, and a model folder says exactly what made it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "deepspeed", "vllm", "bitsandbytes")
# Files above this size are fingerprinted by size and their first and last chunk: hashing a 6 GB
# checkpoint whole takes tens of seconds on every start, and a changed weight file virtually always
# changes its size, header or tail (the safetensors header holds every tensor's offsets).
FULL_HASH_LIMIT = 1 << 30
CHUNK = 16 << 20

def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes (for files over 1 GiB: of its size, first and last 16 MiB; see
    :data:`FULL_HASH_LIMIT`). Not cached: a file rewritten within one tick of a coarse file-system clock,
    with the same size, must not keep its old hash."""
    path = Path(path)
    st = path.stat()
    h = hashlib.sha256()
    with path.open("rb") as f:
        if st.st_size <= FULL_HASH_LIMIT:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        else:
            h.update(f"size {st.st_size}".encode())
            h.update(f.read(CHUNK))
            f.seek(st.st_size - CHUNK)
            h.update(f.read(CHUNK))
    return h.hexdigest()


def source_sha256() -> str:
    """A hash of the library and phase scripts' sources."""
    h = hashlib.sha256()
    files = sorted((REPO_ROOT / "utils").rglob("*.py")) + sorted(REPO_ROOT.glob("*.py"))
    for p in files:
        h.update(str(p.relative_to(REPO_ROOT)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def code_version() -> dict:
    """The code that runs: the git commit when the checkout has one (with ``dirty`` when tracked files
    differ from it), and always a hash of the library and phase scripts' sources (:func:`source_sha256`),
    which also covers uncommitted edits and copies without git."""
    out = {"source_sha256": source_sha256()}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                                timeout=10)
        if commit.returncode == 0:
            out["git_commit"] = commit.stdout.strip()
            status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                                    capture_output=True, text=True, timeout=10)
            out["git_dirty"] = bool(status.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass  # no git here: the source hash alone identifies the code
    return out


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    """Versions of the packages that change what training computes (those installed)."""
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested records, in order.

    >>> differences({"config": {"lr": 1, "seed": 2}, "data": {"sft/train": "ab"}},
    ...             {"config": {"lr": 3, "seed": 2}, "data": {"sft/train": "cd"}})
    ['config.lr', 'data.sft/train']
    """
    keys = list(dict.fromkeys([*old, *new]))
    out = []
    for k in keys:
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{k}.")
        elif json.dumps(a, sort_keys=True, default=str) != json.dumps(b, sort_keys=True, default=str):
            out.append(f"{prefix}{k}")
    return out
