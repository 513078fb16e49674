"""Write outputs completely or not at all.

Every artifact, plan or report is written into a temporary sibling and renamed into place when
complete, so an interrupted run never leaves a half-written output behind, and an existing output
is only replaced when the caller asked for it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from mixsparse.runtime.errors import MixsparseError


def refuse_existing(path: str | os.PathLike, overwrite: bool, flag: str = "--overwrite") -> Path:
    """Fail early (before any long work) when ``path`` exists and overwriting was not asked for."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise MixsparseError(f"output {path} already exists; pass {flag} to replace it")
    return path


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``path`` when the block ends without error."""
    path = refuse_existing(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _replace(tmp, path)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary file path that becomes ``path`` when the block ends without error."""
    path = refuse_existing(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _publish_permissions(tmp)
    os.replace(tmp, path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish_permissions(tmp: Path) -> None:
    """mkdtemp/mkstemp (and some writers) create private 0700/0600 entries; outputs get the umask's."""
    mask = _umask()
    if tmp.is_dir():
        for root, dirs, files in os.walk(tmp):
            os.chmod(root, 0o777 & ~mask)
            for name in files:
                os.chmod(os.path.join(root, name), 0o666 & ~mask)
    else:
        os.chmod(tmp, 0o666 & ~mask)


def _replace(tmp: Path, path: Path) -> None:
    _publish_permissions(tmp)
    if not path.exists():
        os.rename(tmp, path)
        return
    # Move the old output aside first so that a failure between the two renames loses nothing.
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    old.rmdir()
    os.rename(path, old)
    os.rename(tmp, path)
    if old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)
