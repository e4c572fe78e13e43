"""A model folder that appears whole or not at all: built in a staging folder beside its name, then renamed into place.

A crash mid-build never leaves a half model under the name `hub.load` is pointed at, and two processes building the
same folder at once each build in their own staging folder; the first rename wins, the other is discarded. Used by
the baked pretrained encoders and the converted Keras encoders alike.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable

# A build takes well under a minute; a staging folder older than this was abandoned by a killed process.
STALE_STAGING_SECONDS = 3600


def staging_prefix(target: str) -> str:
    """The name prefix of `target`'s staging folders (hidden: readers of the cache skip them)."""
    return f".{os.path.basename(target)}.baking-"


def build_folder_atomically(target: str, build: Callable[[str], None]) -> bool:
    """Make `target` by `build(staging_folder)` unless it exists; True when this call built it.

    `build` fills an existing empty folder; whatever it raises propagates, and its staging folder is removed.
    """
    if os.path.isdir(target):  # it only ever appears by the rename of a finished build
        return False
    root = os.path.dirname(target)
    os.makedirs(root, exist_ok=True)
    _remove_abandoned_staging(root, staging_prefix(target))
    staging = tempfile.mkdtemp(prefix=staging_prefix(target), dir=root)
    os.chmod(staging, 0o755)  # mkdtemp makes it private; a shared cache must be readable by other users
    try:
        build(staging)
        try:
            os.rename(staging, target)
        except OSError:
            # Another process finished the same build first (the rename target exists): keep theirs.
            if not os.path.isdir(target):
                raise
            shutil.rmtree(staging, ignore_errors=True)
            return False
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return True


def _remove_abandoned_staging(root: str, prefix: str) -> None:
    """Delete staging folders that a killed build left behind (never loaded: they are not under the final name)."""
    now = time.time()
    for entry in os.listdir(root):
        path = os.path.join(root, entry)
        # Only old ones: a young one may belong to a build running right now in another process.
        if entry.startswith(prefix) and now - os.path.getmtime(path) > STALE_STAGING_SECONDS:
            shutil.rmtree(path, ignore_errors=True)
