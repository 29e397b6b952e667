"""``shm`` weight-sync transport: versioned safetensors on tmpfs, atomic and checksummed.

Layout under the sync root (owner-only: 0700 directories, 0600 files):

    v00000003/model.safetensors
    v00000003/manifest.json     {"version": 3, "crc32": ..., "bytes": ..., "tensors": 290}

A version directory appears only complete (written under ``.tmp-*``, fsynced, renamed).
The checksum guards against torn or corrupted files, not against an attacker (the owner-only
directory does that), so it is CRC-32: three times cheaper than SHA-256 (0.04 s against 0.14 s
for SmolLM2's 184 MB student in bf16), and it is paid twice per sync, in the training loop.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import zlib
from pathlib import Path

import torch

from switchkd.rollout.weight_sync.interface import (
    SyncTicket,
    WeightReceiver,
    WeightSender,
    WeightSyncError,
    check_newer,
)

WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"
_CHUNK = 8 << 20


def default_root() -> Path:
    """A private directory on tmpfs (/dev/shm) when there is one, else in the temp dir."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix="switchkd-sync-", dir=base))


def version_dir(root: str | Path, version: int) -> Path:
    return Path(root) / f"v{version:08d}"


def checksum_file(path: Path) -> str:
    """The file's CRC-32, as 8 hex digits."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def write_weights(root: str | Path, version: int, state: dict[str, torch.Tensor]) -> Path:
    """Write ``state`` as version ``version`` under ``root``; returns the version directory."""
    from safetensors.torch import save_file

    root = Path(root)
    root.mkdir(mode=0o700, exist_ok=True)  # not its parents: a run's removed sync dir stays removed
    final = version_dir(root, version)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    try:
        weights = tmp / WEIGHTS_FILE
        tensors = {name: t.detach().contiguous() for name, t in state.items()}
        save_file(tensors, str(weights), metadata={"version": str(version)})
        manifest = {"version": version, "crc32": checksum_file(weights), "bytes": weights.stat().st_size,
                    "tensors": len(tensors)}
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest))
        for path in (weights, tmp / MANIFEST_FILE):
            os.chmod(path, 0o600)
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        if final.exists():  # a retry of the same version replaces the earlier attempt
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def read_weights(path: str | Path, version: int) -> list[tuple[str, torch.Tensor]]:
    """The (name, tensor) pairs of version directory ``path``, only if its manifest names
    ``version`` and size and CRC-32 match; WeightSyncError (naming the problem) otherwise."""
    from safetensors.torch import load_file

    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text())
        expected = (int(manifest["version"]), str(manifest["crc32"]), int(manifest["bytes"]))
    except FileNotFoundError as e:
        raise WeightSyncError(f"{path}: {e.filename and Path(e.filename).name} is missing") from None
    except (ValueError, KeyError, TypeError) as e:
        raise WeightSyncError(f"{path}/{MANIFEST_FILE}: unreadable manifest ({e})") from None
    got_version, crc, size = expected
    if got_version != version:
        raise WeightSyncError(f"{path}: manifest is version {got_version}, expected {version}")
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise WeightSyncError(f"{weights} is missing")
    if weights.stat().st_size != size:
        raise WeightSyncError(f"{weights}: {weights.stat().st_size} bytes, manifest says {size} (truncated?)")
    if checksum_file(weights) != crc:
        raise WeightSyncError(f"{weights}: CRC-32 does not match the manifest (corrupt file)")
    try:
        return list(load_file(str(weights)).items())
    except Exception as e:  # safetensors raises its own SafetensorError on a malformed header
        raise WeightSyncError(f"{weights}: not a valid safetensors file ({e})") from None


def prune(root: str | Path, older_than: int) -> None:
    """Delete the version directories under ``root`` older than version ``older_than`` (newer
    ones may be written while the engine loads this one)."""
    for path in Path(root).glob("v*"):
        if path.is_dir() and path.name[1:].isdigit() and int(path.name[1:]) < older_than:
            shutil.rmtree(path, ignore_errors=True)


class ShmSender(WeightSender):
    """Writes each version as a directory under ``root``; the ticket carries its path."""

    def __init__(self, root: str | Path) -> None:
        self.root = root

    def send(self, state: dict[str, torch.Tensor], version: int) -> SyncTicket:
        return SyncTicket(version, "shm", str(write_weights(self.root, version, state)))


class ShmReceiver(WeightReceiver):
    """Reads the version directory a ticket names, refusing an old version before reading it."""

    def receive(self, ticket: SyncTicket, current_version: int) -> tuple[int, list[tuple[str, torch.Tensor]]]:
        check_newer(ticket.version, current_version)
        return ticket.version, read_weights(ticket.path, ticket.version)
