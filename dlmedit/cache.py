"""The user cache directory, crash-safe file writes and file checksums.

Why this exists: dlmedit caches expensive artefacts (second-moment statistics take
hours on real models) and writes result files that later runs resume from.  A file
half-written when a run is killed must never be mistaken for a complete one, so every
cache / results file in the project is written through the helpers here: the data
goes to a temporary file in the *same directory*, is flushed and fsynced, and is then
renamed over the destination with :func:`os.replace`, which is atomic on POSIX and
Windows.  Readers therefore see either the old file or the new one, never a prefix.
Saved tensors carry a sha256 of their file (:func:`sha256_file`) in their JSON sidecar,
so a file swapped or corrupted behind the sidecar's back is detected on load.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CACHE_ENV_VAR",
    "atomic_path",
    "atomic_save_safetensors",
    "atomic_write_bytes",
    "atomic_write_json",
    "cache_dir",
    "hash_file_into",
    "sha256_file",
]

CACHE_ENV_VAR = "DLMEDIT_CACHE"


def cache_dir(subdir: str | None = None, *, create: bool = True) -> Path:
    """Return the dlmedit cache directory (optionally a sub-directory of it).

    Resolution order: ``$DLMEDIT_CACHE``; else ``$XDG_CACHE_HOME/dlmedit``; else
    ``~/.cache/dlmedit``.  The environment is read on every call so tests and users
    can redirect the cache without re-importing.
    """
    env = os.environ.get(CACHE_ENV_VAR)
    if env:
        root = Path(env).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
        root = base / "dlmedit"
    path = root / subdir if subdir else root
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OSError(
                f"cannot create the dlmedit cache directory {path}: {exc}. Set {CACHE_ENV_VAR} to a writable directory."
            ) from exc
    return path


def _fsync_dir(directory: Path) -> None:
    """Persist a rename on POSIX (best effort: not every OS / filesystem allows it)."""
    if os.name != "posix":
        return
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


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it over ``path``.

    For writers that insist on a file name (e.g. ``safetensors.torch.save_file``).
    If the body raises, the temporary file is removed and ``path`` is untouched.
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # The writer may have replaced the file; fsync whatever is there now.
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(dest.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns the destination path."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"atomic_write_bytes expects bytes, got {type(data).__name__}")
    dest = Path(path)
    with atomic_path(dest) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
    return dest


def atomic_write_json(
    path: str | os.PathLike[str],
    obj: Any,
    *,
    indent: int | None = 2,
    allow_nan: bool = False,
) -> Path:
    """Serialise ``obj`` as JSON and write it atomically.

    ``allow_nan`` defaults to False because NaN/Infinity are not valid JSON and break
    other readers (jq, JavaScript); pass True for files only dlmedit reads back.
    """
    try:
        text = json.dumps(obj, indent=indent, sort_keys=True, allow_nan=allow_nan, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"cannot write {path} as JSON: {exc}") from exc
    return atomic_write_bytes(path, (text + "\n").encode("utf-8"))


def atomic_save_safetensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Save ``tensors`` as a safetensors file, atomically.

    Tensors are detached, moved to CPU and made contiguous; tensors that share storage
    (tied weights, views) are cloned, because the safetensors format cannot express
    aliasing.  ``metadata`` must map strings to strings (a format restriction).
    """
    from safetensors.torch import save_file

    if metadata is not None:
        bad = {k: type(v).__name__ for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)}
        if bad:
            raise ValueError(f"safetensors metadata must map str to str; offending entries: {bad}")
    prepared: dict[str, torch.Tensor] = {}
    seen_storage: set[int] = set()
    for name, tensor in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"safetensors keys must be strings, got {name!r}")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"value for {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
        t = tensor.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if t.numel() > 0 and ptr in seen_storage:
            t = t.clone()
        elif t.numel() > 0:
            seen_storage.add(ptr)
        prepared[name] = t
    dest = Path(path)
    with atomic_path(dest) as tmp:
        save_file(
            prepared,
            str(tmp),
            metadata=dict(metadata) if metadata is not None else None,
        )
    return dest


def hash_file_into(h: Any, path: str | os.PathLike[str]) -> None:
    """Feed the bytes of ``path`` into the hashlib object ``h``, 1 MiB at a time.

    Chunked so that checksumming a multi-GB statistics or delta file never holds it in memory.
    """
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes (the checksum recorded next to saved tensors)."""
    h = hashlib.sha256()
    hash_file_into(h, path)
    return h.hexdigest()


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary directory next to ``path``; on success it replaces ``path`` whole.

    For artefacts that are folders (a checkpoint, an adapter, a training state): a reader
    — or a run resumed after ``kill -9`` — sees the old folder or the new one, never a
    half-written one and never none.  An existing folder is swapped with the new one in
    one atomic ``renameat2(RENAME_EXCHANGE)`` on Linux; elsewhere it is moved aside first
    (two renames).  If the body raises, the temporary folder is removed and ``path`` is
    untouched.
    """
    import shutil

    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        yield tmp
        if not dest.exists():
            os.replace(tmp, dest)
        elif not _exchange(tmp, dest):
            aside = Path(tempfile.mkdtemp(prefix=f".{dest.name}-old-", dir=dest.parent)) / dest.name
            os.replace(dest, aside)
            os.replace(tmp, dest)
            shutil.rmtree(aside.parent, ignore_errors=True)
    finally:
        if tmp.exists():  # the body failed, or tmp now holds the replaced folder
            shutil.rmtree(tmp, ignore_errors=True)
    _fsync_dir(dest.parent)
