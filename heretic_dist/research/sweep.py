"""The per-layer direction sweep: each layer's direction alone (global scope, weight 1 on every layer,
no kernel), scored as ordinary trials spread over the worker pool.

The trial for layer i is expressed in the search space's own parameters, inside its ranges, so it can
also be enqueued into the run's study (`--seed-search`): direction_index = i, and for each component
max_weight = 1, min_weight = 1 (a fraction of max_weight), max_weight_position = 0.6 L and
min_weight_distance = 0.6 L, which covers layers 0..L with a tent whose ends equal its peak: the weight
is exactly 1 on every layer.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
from typing import TYPE_CHECKING, Any, Callable

from ..search.objectives import Shard, reduce_partials
from ..search.space import decode_trial_params

if TYPE_CHECKING:
    from ..distributed.pool import WorkerPool


def raw_params(layer: int, n_layers: int, components: list[str]) -> dict[str, Any]:
    """The sweep's trial for `layer` in the search space's raw names (what study.enqueue_trial takes)."""
    last = n_layers - 1
    raw: dict[str, Any] = {"direction_scope": "global", "direction_index": float(layer)}
    for c in sorted(components):
        raw.update({f"{c}.max_weight": 1.0, f"{c}.max_weight_position": 0.6 * last, f"{c}.min_weight": 1.0,
                    f"{c}.min_weight_distance": 0.6 * last})
    return raw


def sweep_params(layer: int, n_layers: int, components: list[str]):
    return decode_trial_params(raw_params(layer, n_layers, components), n_layers)


def run_sweep(pool: WorkerPool, n_layers: int, components: list[str], shards: int,
              say: Callable[[str], None] = print) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(one row per layer, the base model's row). Trials run P = workers / shards at a time."""
    def trial(params: dict[str, Any] | None) -> dict[str, Any]:
        run = pool.run_sharded("run_trial", [(params, Shard(i, shards)) for i in range(shards)])
        return reduce_partials(run.results)

    base = trial(None)
    in_flight = max(1, pool.size() // shards)
    rows: list[dict[str, Any]] = [{} for _ in range(n_layers)]
    with cf.ThreadPoolExecutor(in_flight) as ex:
        futures = {ex.submit(trial, sweep_params(i, n_layers, components).to_dict()): i for i in range(n_layers)}
        for done, future in enumerate(cf.as_completed(futures), 1):
            i = futures[future]
            r = future.result()
            rows[i] = {"layer": i, "direction_index": float(i), "refusals": r["refusals"],
                       "bad_scored": r["bad_scored"], "kl": r["kl"], "good_scored": r["good_scored"],
                       "params": raw_params(i, n_layers, components)}
            say(f"sweep: layer {i}: {r['refusals']}/{r['bad_scored']} refusals, KL {r['kl']:.4f} "
                f"({done}/{n_layers})")
    return rows, {"refusals": base["refusals"], "bad_scored": base["bad_scored"]}


def best_layers(rows: list[dict[str, Any]], n: int, n_layers: int) -> list[dict[str, Any]]:
    """The n best sweep rows (fewest refusals, then lowest KL) whose layer lies in the search space's
    direction_index range [0.4 L, 0.9 L] (a trial outside it could not be told to TPE as in range)."""
    last = n_layers - 1
    inside = [r for r in rows if 0.4 * last <= r["direction_index"] <= 0.9 * last]
    return sorted(inside, key=lambda r: (r["refusals"], r["kl"]))[:n]


def seed_study(journal: str, run_id: str, rows: list[dict[str, Any]]) -> int:
    """Enqueue these sweep trials as the next trials of the run's study (they count toward n_trials)."""
    from ..search.study import open_study

    study = open_study(journal, run_id)
    for r in rows:
        params = r["params"] if isinstance(r["params"], dict) else json.loads(r["params"])
        study.enqueue_trial(params, user_attrs={"enqueued_by": "research sweep"})
    return len(rows)
