"""Write outputs completely or not at all.

Every artifact, plan or report is written into a temporary sibling and renamed into place when
complete, so an interrupted run never leaves a half-written output behind, and an existing output
is only replaced when the caller asked for it. A run killed outright (SIGKILL, power loss) cannot
remove its temporary sibling; it is named after its host and process id so that the next write of
the same output removes it once that process is gone.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterator

from mixsparse.runtime.errors import MixsparseError


def refuse_existing(path: str | os.PathLike, overwrite: bool, flag: str = "--overwrite") -> Path:
    """Fail early (before any long work) when ``path`` exists and overwriting was not asked for."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise MixsparseError(f"output {path} already exists; pass {flag} to replace it")
    check_writable(path)
    return path


def check_writable(path: str | os.PathLike) -> None:
    """Fail before long work when ``path`` could not be created: its nearest existing ancestor is not a
    directory we can write in (read-only, another user's, a read-only mount). Probed by creating an entry
    there, since os.access says yes to root even where the write would fail."""
    path = Path(path).absolute()
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise MixsparseError(f"cannot write {path}: {parent} is not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f".{path.name}.probe-", dir=parent))
    except OSError as error:
        raise MixsparseError(
            f"cannot write {path}: no permission to create entries in {parent} ({error.strerror})"
        ) from None


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale(path: Path) -> list[Path]:
    """Remove temporary siblings of ``path`` left by processes of this host that no longer exist."""
    host = socket.gethostname()
    removed = []
    for entry in path.parent.glob(f"{glob.escape(f'.{path.name}.tmp-')}*"):
        owner = entry.name[len(f".{path.name}.tmp-") :].rsplit("-", 2)
        if len(owner) != 3 or owner[0] != host or not owner[1].isdigit() or _alive(int(owner[1])):
            continue  # another host's, a live process's, or not ours to judge
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``path`` when the block ends without error."""
    path = refuse_existing(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), dir=path.parent))
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
    remove_stale(path)
    fd, name = tempfile.mkstemp(prefix=_temp_prefix(path), dir=path.parent)
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
