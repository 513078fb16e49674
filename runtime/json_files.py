"""JSON files read with one-line errors that name the file, and written atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path

from mixsparse.runtime.atomic import atomic_file
from mixsparse.runtime.errors import MixsparseError


def read_json(path: str | os.PathLike, what: str, missing: str | None = None):
    """The parsed contents of ``path``; ``what`` names the file in errors ("plan file x.json ..."), ``missing`` is
    the whole message when the file does not exist."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise MixsparseError(missing or f"{what} {path} does not exist") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise MixsparseError(f"{what} {path} is not valid JSON ({error})") from None
    except OSError as error:
        raise MixsparseError(f"cannot read {what} {path} ({error.strerror})") from None


def write_json(path: str | os.PathLike, data, overwrite: bool = False, indent: int | None = 2) -> None:
    with atomic_file(path, overwrite=overwrite) as tmp:
        tmp.write_text(json.dumps(data, indent=indent) + "\n")
