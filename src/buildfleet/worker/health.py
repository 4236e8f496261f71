"""Is this bot fit to take work?  Its directories must be writable and its disk not full.

`check_health` creates and removes a probe file in each directory the bot
writes to (the work directory and the cache) and compares the free space of
their file systems with a floor.  It returns None when all is well, otherwise a
sentence naming the problem; the bot then reports UNHEALTHY (and the server
gives it no work) until a later check passes.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path


def check_health(directories: Iterable[Path], min_free_bytes: int) -> str | None:
    """None when every directory is writable with enough free space; else the problem."""
    for directory in directories:
        probe = directory / f".health-{uuid.uuid4().hex}"
        try:
            if not directory.is_dir():
                return f"{directory} is not a directory"
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, b"ok")
            finally:
                os.close(fd)
            probe.unlink()
        except OSError as error:
            return f"{directory} is not writable: {error.strerror or error}"
        if min_free_bytes > 0:
            try:
                free = shutil.disk_usage(directory).free
            except OSError as error:
                return f"cannot read the free space of {directory}: {error.strerror or error}"
            if free < min_free_bytes:
                return (f"only {free} bytes free under {directory}, below the floor of "
                        f"{min_free_bytes}")
    return None
