"""`python -m heretic_dist ...` is `heretic-dist ...`; the only module that imports the CLI.

`python -m heretic_dist --child PARENT_PID run ...` is how `batch` starts a model's run: the child is
killed with the batch process (Linux: PR_SET_PDEATHSIG), as a lost machine would take both.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys


def _die_with_parent(parent: int) -> bool:
    """Ask the kernel to SIGKILL this process when its parent dies; False if the parent is gone."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    return os.getppid() == parent  # else the parent died before the call above


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) >= 2 and args[0] == "--child":
        if not _die_with_parent(int(args[1])):
            return 1
        args = args[2:]
    from heretic_dist.cli import main as cli_main

    return leave_process(cli_main(args))


def leave_process(code: int) -> int:
    """The process's exit, here and not in cli.main(): a caller of main() in its own process (a test, a
    library) must not be ended. After S3 use or Parquet decoding, pyarrow can abort the interpreter at
    exit (134, rundir/parquet.py); everything is written and flushed by now: leave without teardown."""
    from heretic_dist import rundir as storage
    from heretic_dist.rundir.parquet import rows_decoded

    if storage.s3_used() or rows_decoded():
        import logging
        import os

        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
