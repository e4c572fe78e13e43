"""What a local path is when it is not a regular file, for the readers and the image fetch alike.

Such a file is never opened: a FIFO blocks a read for ever, a device such as /dev/zero never ends, a folder is
no file. Object stores hold none of them.
"""

from __future__ import annotations

import stat

_SPECIAL_FILE_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"))


def special_kind(mode: int) -> str | None:
    """None for a regular file (by its `st_mode`), else what it is, as a dead letter names it."""
    if stat.S_ISREG(mode):
        return None
    return next((name for is_kind, name in _SPECIAL_FILE_KINDS if is_kind(mode)), "not a regular file")
