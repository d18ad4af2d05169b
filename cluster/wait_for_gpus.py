"""Ask the Ray autoscaler for GPUs and wait until the cluster has them.

`heretic-dist run` checks at start that the cluster, as it is at that moment, can hold the workers
it waits for (`--min-workers`; the others wait as pending actors). A launcher cluster that scales
its GPU workers from zero has none yet, so run this first, on the head:

    ray submit cluster/aws-spot.yaml cluster/wait_for_gpus.py --gpus 4

It asks the autoscaler for `--gpus` one-GPU bundles (request_resources) and returns once the
cluster has that many GPUs. The request stays in force, so the autoscaler also keeps the cluster at
that size while the run replaces lost spot nodes. Release it when the run is done (or `ray down`):

    ray submit cluster/aws-spot.yaml cluster/wait_for_gpus.py --release
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Callable


def wait_for(have: Callable[[], float], need: float, timeout_s: float, poll_s: float = 10.0,
             sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic,
             report: Callable[[str], None] = print) -> bool:
    """Poll `have()` until it reaches `need`; False after `timeout_s`."""
    deadline = clock() + timeout_s
    last = None
    while True:
        now = have()
        if now >= need:
            report(f"cluster has {now:g} GPUs (asked for {need:g})")
            return True
        if now != last:
            report(f"cluster has {now:g} of {need:g} GPUs; waiting for the autoscaler")
            last = now
        if clock() >= deadline:
            return False
        sleep(poll_s)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--gpus", type=int, help="GPUs to ask for (one-GPU bundles): workers x gpus per worker")
    what.add_argument("--release", action="store_true", help="withdraw an earlier request")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait (default 1800)")
    parser.add_argument("--address", default="auto", help="Ray address (default auto: the cluster on this node)")
    args = parser.parse_args(argv)
    if args.gpus is not None and args.gpus < 1:
        parser.error("--gpus must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import ray
    from ray.autoscaler.sdk import request_resources

    ray.init(address=args.address, logging_level="ERROR", log_to_driver=False)
    if args.release:
        request_resources(bundles=[])
        print("released the GPU request; idle GPU nodes will be removed")
        return 0
    request_resources(bundles=[{"GPU": 1}] * args.gpus)
    if wait_for(lambda: ray.cluster_resources().get("GPU", 0.0), args.gpus, args.timeout):
        return 0
    print(f"timed out after {args.timeout:g} s; see `ray status` on the head (spot capacity, quotas)",
          file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
