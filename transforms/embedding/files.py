"""Files as every stage sees them: the paths a glob matches, and what a local path is when it is not a regular file.

A file that is not regular is never opened: a FIFO blocks a read for ever, a device such as /dev/zero never ends, a
folder is no file. Object stores hold none of them.
"""

from __future__ import annotations

import stat

from apache_beam.io.filesystems import FileSystems

_SPECIAL_FILE_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"))


def special_kind(mode: int) -> str | None:
    """None for a regular file (by its `st_mode`), else what it is, as a dead letter names it."""
    if stat.S_ISREG(mode):
        return None
    return next((name for is_kind, name in _SPECIAL_FILE_KINDS if is_kind(mode)), "not a regular file")


def matching_files(pattern: str) -> list[tuple[str, int]]:
    """(path, size in bytes) of each file `pattern` matches on any Beam filesystem, sorted by path; none when
    nothing matches (some filesystems raise BeamIOError for a pattern under a folder that does not exist)."""
    try:
        return sorted((found.path, found.size_in_bytes)
                      for result in FileSystems.match([pattern]) for found in result.metadata_list)
    except Exception:
        return []


def matching_paths(pattern: str) -> list[str]:
    """The paths `pattern` matches, sorted (see matching_files)."""
    return [path for path, _ in matching_files(pattern)]
