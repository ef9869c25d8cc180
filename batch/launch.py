"""The process entry point of ``imgbatch`` and ``python -m batch``: start-up, then the CLI.

Two imports dominate the start of every command. aiohttp loads the system's CA
certificates while it is imported (two SSL contexts, ~60 ms in OpenSSL, which lets
go of the GIL), and numpy (~50 ms of Python) holds the checkpoint's index. numpy is
imported in a thread while this one imports aiohttp, so that on a machine with a
free core the two overlap; on a busy one nothing is lost, since the CLI's own import
of numpy waits for the thread's instead of starting another. The CLI itself never
depends on this: imported any other way, it imports what it needs as usual.
"""

from __future__ import annotations

import contextlib
import importlib
import threading


def _preload(name: str) -> None:
    # A failure is the CLI's to report, when its own import of the module fails the same way.
    with contextlib.suppress(Exception):
        importlib.import_module(name)


def main() -> None:
    """``imgbatch``: overlap the slow imports (module doc), then run the command line."""
    preload = threading.Thread(target=_preload, args=("numpy",), name="imgbatch-preload",
                               daemon=True)
    preload.start()
    try:
        import aiohttp  # noqa: F401 - first, while the thread imports numpy

        from batch.cli import entry

        entry()
    finally:
        # A command that never needed numpy (--version) must not end mid-import.
        preload.join()
