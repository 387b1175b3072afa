"""Which files the page may serve: regular files under the folders `wan-opt serve` was given, and no others.

A file is named to the browser as `<folder number>/<path inside it>`. Absolute paths, `..`, hidden names
(`.hydra/`, the `.partial` files a run writes before renaming) and symlinks that lead out of the folder are
refused; so is any kind of file the page has no use for.
"""
from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Sequence

SERVED_SUFFIXES = {".mp4": "video/mp4", ".webm": "video/webm", ".png": "image/png", ".jpg": "image/jpeg",
                   ".jpeg": "image/jpeg", ".webp": "image/webp", ".json": "application/json"}


class Refused(Exception):
    """A path the page will not serve; `status` is the HTTP status to answer with, the message says why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Roots:
    """The folders given on the command line, resolved once; every served path is checked against them."""

    def __init__(self, folders: Sequence[Path]):
        self.folders = [Path(folder).expanduser().resolve() for folder in folders]

    def ref(self, path: Path) -> str | None:
        """The page's name for `path` (as found while walking a folder), or None when it lies under none."""
        for number, folder in enumerate(self.folders):
            try:
                inside = path.relative_to(folder)
            except ValueError:
                continue
            return f"{number}/{inside.as_posix()}"
        return None

    def resolve(self, ref: str) -> Path:
        """The file a page name stands for; raises Refused (403 outside the folders, 404 missing)."""
        number, _, rest = ref.partition("/")
        if not number.isdigit() or int(number) >= len(self.folders):
            raise Refused(404, f"No served folder is numbered {number!r}.")
        folder = self.folders[int(number)]
        if not rest or "\\" in rest or "\x00" in rest or rest.startswith("/"):
            raise Refused(403, "Only paths inside a served folder are served.")
        parts = PurePosixPath(rest).parts
        if any(part in ("..", ".") or part.startswith(".") for part in parts):
            raise Refused(403, "Paths with '..' or hidden names are not served.")
        if PurePosixPath(rest).suffix.lower() not in SERVED_SUFFIXES:
            raise Refused(403, f"Only {', '.join(sorted(SERVED_SUFFIXES))} files are served.")
        path = folder.joinpath(*parts)
        try:
            real = path.resolve(strict=True)  # follows symlinks: one that leads out of the folder is refused
        except (OSError, RuntimeError):
            raise Refused(404, "There is no such file.") from None
        if not real.is_relative_to(folder):
            raise Refused(403, "That path leads out of the served folder.")
        if not real.is_file():
            raise Refused(404, "There is no such file.")
        return real


def media_type(path: Path) -> str:
    return SERVED_SUFFIXES.get(path.suffix.lower(), "application/octet-stream")
