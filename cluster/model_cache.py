"""How a build lands in the model cache: the folder, its free space, a per-model lock, and renames.

A build is written into a hidden sibling folder and renamed into place only once it is complete,
under a lock that serializes builds of one model across processes.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from .build_errors import ModelBuildError

_MIB = 1024 * 1024


def ensure_dir(model_dir: Path) -> None:
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ModelBuildError(
            f"cannot create the model cache folder {model_dir}: {error.strerror or error}. "
            f"Set TOKENMART_CACHE_DIR to a writable folder."
        ) from error


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def check_free_space(model_dir: Path, needed: int, name: str) -> None:
    """Fail in a second on a full disk, rather than after the minute the build `name` takes."""
    free = free_bytes(model_dir)
    if free < needed:
        raise ModelBuildError(
            f"building {name} needs about {needed // _MIB} MiB free in {model_dir}, "
            f"but only {free // _MIB} MiB is free there. Free some space, or point TOKENMART_CACHE_DIR "
            f"at a folder on a disk with more room."
        )


@contextlib.contextmanager
def build_lock(model_dir: Path, name: str) -> Iterator[None]:
    """Serialize builds of one model across processes (a CLI launch and a worker may race)."""
    lock_path = model_dir / f".{name}.lock"
    with open(lock_path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def remove_leftovers(model_dir: Path, name: str) -> None:
    """Delete temporary folders of earlier builds that crashed; under the lock none is in use."""
    for pattern in (f".{name}.tmp-*", f".{name}.old-*"):
        for leftover in model_dir.glob(pattern):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)


def swap_into_place(tmp: Path, dest: Path) -> None:
    """Replace `dest` by `tmp` with renames only, so `dest` is never a half-written folder.

    A non-empty directory cannot be replaced by one rename, so an existing build is first moved
    aside; it disappears only once the new one is in place.
    """
    old: Path | None = None
    if dest.exists() or dest.is_symlink():
        old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(dest, old)
    os.rename(tmp, dest)
    if old is not None:
        if old.is_symlink() or not old.is_dir():
            old.unlink(missing_ok=True)
        else:
            shutil.rmtree(old, ignore_errors=True)


def make_readable(folder: Path) -> None:
    """mkdtemp creates 0700 folders; a shared cache must be readable by serving processes too."""
    folder.chmod(0o755)
    for path in folder.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
