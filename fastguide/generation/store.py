"""The files of a generation run: checked shards, the manifest, ``samples.npz``; every write atomic.

Layout of ``DIR``::

    manifest.json                      the run's configuration, shard checksums, run history (atomic rewrite)
    samples.npz                        arr_0 uint8 [N, H, W, C], arr_1 int64 labels, seeds int64 (seed order)
    shards/shard_00012.npz             float32 samples [n, C, H, W], labels int64 [n], seeds int64 [n]
    shards/shard_00012.json            its sidecar: sha256, size, seeds, config id, provenance
    shards/partial/shard_00012-b32-0003.npz (+ .json)   finished batches of a shard still in flight

A data file is written to a temporary file in the same directory, flushed and fsynced, then moved into
place with ``os.replace`` (atomic on POSIX); its sidecar is written the same way *after* it. A file is
valid only when its sidecar exists, names this run's configuration, and the file's size and sha256 match
— so a process killed at any moment leaves either a valid file or one that the next run redoes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import zipfile
from typing import Any, BinaryIO, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

MANIFEST = "manifest.json"
SAMPLES = "samples.npz"
SHARDS = "shards"
PARTIAL = "partial"
TMP_MARK = ".tmp-"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()  # what open() would give: mkstemp's temporaries are 0600


def shard_name(index: int) -> str:
    return f"shard_{index:05d}"


def shard_path(out: str, index: int) -> str:
    return os.path.join(out, SHARDS, shard_name(index) + ".npz")


def partial_path(out: str, index: int, batch: int, part: int) -> str:
    return os.path.join(out, SHARDS, PARTIAL, f"{shard_name(index)}-b{batch}-{part:04d}.npz")


def sidecar_path(path: str) -> str:
    return os.path.splitext(path)[0] + ".json"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, data: Union[bytes, Callable[[BinaryIO], None]]) -> None:
    """Write ``data`` (bytes, or a function writing to a binary file) to ``path`` atomically: a temporary
    file in the same directory, fsync, ``os.replace``."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + TMP_MARK, dir=directory)
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(directory)


def write_npz(f: BinaryIO, arrays: Dict[str, np.ndarray]) -> None:
    """``np.savez`` (uncompressed, readable by ``np.load``) with fixed member timestamps, so the same arrays
    always give the same bytes — and the same sha256, whatever the machine, process count or time."""
    with zipfile.ZipFile(f, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            with zf.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    write_npz(buf, arrays)
    return buf.getvalue()


def write_json(path: str, obj: Any) -> None:
    atomic_write(path, (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode())


def read_json(path: str) -> Any:
    with open(path, "rb") as f:
        return json.loads(f.read().decode())


def write_checked(path: str, arrays: Dict[str, np.ndarray], sidecar: Dict[str, Any]) -> str:
    """Write an npz of ``arrays`` atomically, then its sidecar (``sidecar`` plus sha256 and size); returns
    the sha256."""
    data = npz_bytes(**arrays)
    digest = sha256_bytes(data)
    atomic_write(path, data)
    write_json(sidecar_path(path), {**sidecar, "file": os.path.basename(path), "sha256": digest,
                                    "bytes": len(data)})
    return digest


class Invalid(Exception):
    """A stored file that must be redone: missing, truncated, corrupt, or from another configuration."""


def read_checked(path: str, config_id: str, seeds: Optional[Sequence[int]] = None,
                 load: bool = True) -> Tuple[Dict[str, Any], Optional[Dict[str, np.ndarray]]]:
    """The sidecar and (``load``) arrays of a checked file, or ``Invalid`` saying why it must be redone.

    The sha256 is always verified (the whole file is read); ``seeds`` checks the stored seeds too.
    """
    side = sidecar_path(path)
    if not os.path.exists(path):
        raise Invalid("missing")
    if not os.path.exists(side):
        raise Invalid("no checksum sidecar (killed while writing?)")
    try:
        meta = read_json(side)
    except (OSError, ValueError) as e:
        raise Invalid(f"unreadable sidecar ({e})") from None
    if not isinstance(meta, dict) or "sha256" not in meta:
        raise Invalid("sidecar without a checksum")
    if meta.get("config_id") != config_id:
        raise Invalid("written by another configuration")
    size = os.path.getsize(path)
    if size != meta.get("bytes"):
        raise Invalid(f"size {size} bytes, sidecar says {meta.get('bytes')} (truncated?)")
    with open(path, "rb") as f:
        data = f.read()
    if sha256_bytes(data) != meta["sha256"]:
        raise Invalid("sha256 mismatch (corrupt)")
    arrays = None
    if load or seeds is not None:
        try:
            with np.load(io.BytesIO(data)) as z:
                arrays = {k: z[k] for k in z.files}
        except Exception as e:  # noqa: BLE001 - any unreadable file is redone
            raise Invalid(f"unreadable npz ({e})") from None
        if seeds is not None:
            stored = arrays.get("seeds")
            if stored is None or stored.shape != (len(seeds),) or not np.array_equal(stored, np.asarray(seeds)):
                raise Invalid("holds other seeds than its shard")
            for key in ("samples", "labels"):
                if key not in arrays or len(arrays[key]) != len(seeds):
                    raise Invalid(f"{key!r} missing or of the wrong length")
    return meta, arrays


def remove_quietly(paths: Iterable[str]) -> None:
    for p in paths:
        try:
            os.unlink(p)
        except OSError:
            pass


def stale_temporaries(out: str) -> List[str]:
    """Temporary files left by killed writers (never valid: a finished write renames its temporary)."""
    found = []
    for directory in (out, os.path.join(out, SHARDS), os.path.join(out, SHARDS, PARTIAL)):
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        found += [os.path.join(directory, n) for n in names if TMP_MARK in n]
    return found


def partials_of(out: str, index: int) -> List[str]:
    directory = os.path.join(out, SHARDS, PARTIAL)
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    prefix = shard_name(index) + "-"
    return [os.path.join(directory, n) for n in names if n.startswith(prefix)]


def existing_shards(out: str) -> List[str]:
    try:
        return sorted(n for n in os.listdir(os.path.join(out, SHARDS)) if n.startswith("shard_"))
    except OSError:
        return []
