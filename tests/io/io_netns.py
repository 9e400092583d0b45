"""Run a callable inside a test network namespace (for creating sockets and TUN devices there)."""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL("libc.so.6", use_errno=True)


def call_in_netns(name: str, fn: Callable[[], T]) -> T:
    """Run fn in a short-lived thread that joined netns `name`: sockets and TUN devices it creates belong to
    that namespace and stay usable from any thread afterwards. The calling thread's namespace is untouched."""
    box: dict[str, object] = {}

    def run() -> None:
        fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns failed")
            box["value"] = fn()
        except BaseException as exc:  # handed back to the caller below
            box["error"] = exc
        finally:
            os.close(fd)

    t = threading.Thread(target=run)
    t.start()
    t.join(timeout=30)
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]
