"""`refusal_judge`: a judge replaces the marker count inside the search (the worker judges its shard)."""

from __future__ import annotations

import pytest
from test_engine import BAD, GOOD, make_settings, raw_params
from tiny_models import tiny_model_folder

from heretic_dist.distributed.worker import ModelWorker
from heretic_dist.engine.ablation import directions_from_sums
from heretic_dist.search.space import decode_trial_params
from heretic_dist.engine.types import Shard

MARKERS = ["e", "th"]  # a random tiny model's replies: common letters make some replies "refusals"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory.mktemp("judge-llama"), "llama")


def ready_worker(folder, **overrides) -> ModelWorker:
    worker = ModelWorker("hf", make_settings(folder, refusal_markers=MARKERS, max_response_length=10, **overrides))
    (good, n_good), (bad, n_bad) = worker.residual_sums(GOOD), worker.residual_sums(BAD)
    worker.set_directions(directions_from_sums(good, n_good, bad, n_bad, True))
    worker.set_eval_prompts(GOOD, BAD)
    return worker


def test_a_keyword_judge_in_the_search_counts_what_the_markers_count(folder):
    plain = ready_worker(folder)
    judged = ready_worker(folder, refusal_judge={"name": "keywords", "thinking_tags": []})
    never = ready_worker(folder, refusal_judge={"name": "keywords", "markers": ["no such marker"]})
    n_layers = plain.info()["n_layers"]
    counts = []
    for weight in (None, 0.5, 1.5):
        params = None if weight is None else decode_trial_params(raw_params(n_layers, max_weight=weight), n_layers)
        a, b, c = (w.run_trial(params, Shard()) for w in (plain, judged, never))
        assert b.refusals == a.refusals and b.kl_sum == a.kl_sum  # same verdicts, replies read in full
        assert c.refusals == 0
        assert b.replies_to_judge is None and "judge_s" in b.timings and "judge_s" not in a.timings
        counts.append(a.refusals)
    assert any(counts), "the markers never matched: the test would not tell the judge from 0"


def test_refusal_judge_is_a_result_affecting_table():
    from heretic_dist.config import Settings

    s = Settings(model="m", refusal_judge={"name": "keywords"})
    assert s.result_affecting()["refusal_judge"]["name"] == "keywords"
    assert Settings(model="m").result_affecting()["refusal_judge"] is None
