"""Command-line options that several commands share: the Ray cluster to use and its worker pool."""

from __future__ import annotations

import argparse

ADDRESS_HELP = "join this Ray cluster ('auto' for the local one); default: start one"


def gpus_value(text: str) -> float | str:
    """--gpus-per-worker: a number or "auto"."""
    return text if text == "auto" else float(text)


def add_cluster_options(p: argparse.ArgumentParser, *, elastic: bool = False) -> None:
    """--address, --workers (with `elastic`: --min-workers), --cpus-per-worker, --gpus-per-worker."""
    p.add_argument("--address", help=ADDRESS_HELP)
    p.add_argument("--workers", type=int, help="model workers (each loads the model once)")
    if elastic:
        p.add_argument("--min-workers", type=int, metavar="M",
                       help="start trials once M workers are loaded; the others join as their nodes come up "
                            "(default: all on a local cluster, shards per trial with --address)")
    p.add_argument("--cpus-per-worker", type=float, help="CPUs per worker")
    p.add_argument("--gpus-per-worker", type=gpus_value, help='GPUs per worker (fractions share a GPU; "auto")')
