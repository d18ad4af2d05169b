"""`evaluate-front`: rebuild the chosen candidates on the workers, measure them, judge the replies.

Order of work: the run's manifest, study and directions are read; the candidates are chosen (the
front, the top K of it, or given trials) plus the base model; candidates that already have a row of
this evaluation (same key: run, measures, lengths, prompt sets, judge) are skipped, so a killed
evaluation resumes with the rest. The others are spread over the worker pool, one candidate per
worker at a time (a LoRA edit, no reload); as each comes back its replies are judged on the driver
(the classifier judge in its own Ray actor) and its row is written at once to evaluation.parquet.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from .. import rundir as st
from ..config.evaluation import EvaluationSettings
from ..errors import UserError
from ..prompts import load_prompt_set, prompt_set_hash
from . import measures
from .rows import BASE_TRIAL, Candidate, candidate_row, choose_trials, evaluation_key

if TYPE_CHECKING:
    from ..config import Settings
    from ..engine.types import EvaluationRequest, EvaluationResult, Prompt


@dataclass
class EvaluationPlan:
    """Everything one evaluation measures, prepared on the driver before any worker is used."""

    settings: Settings  # the run's settings (its response prefix included)
    evaluation: EvaluationSettings
    run_id: str
    key: str
    request: EvaluationRequest
    candidates: list[Candidate]
    notes: list[str] = field(default_factory=list)


@dataclass
class EvaluationOutcome:
    rows: list[dict[str, Any]]  # this evaluation's rows, base first
    evaluated: list[int]  # candidates measured now (trial numbers; -1 = base)
    reused: list[int]  # candidates whose rows were already there
    seconds: float
    judge_stats: dict[str, int]
    notes: list[str]


def _load_sets(settings: Settings, evaluation: EvaluationSettings, notes: list[str]) -> dict[str, list[Prompt]]:
    """The evaluation's prompt sets; a switched-off measure gets an empty list."""
    def load(spec, label: str) -> list[Prompt]:
        return load_prompt_set(spec, settings.system_prompt, label=f"evaluation.{label}")

    sets: dict[str, list[Prompt]] = {"harmful": [], "over_refusal": [], "damage": [], "texts": []}
    if evaluation.refusal:
        if evaluation.harmful_prompts is None:
            notes.append("refusals are counted on the search's own bad_evaluation_prompts (not held out); "
                         "give [evaluation.harmful_prompts] for a held-out set")
            sets["harmful"] = load(settings.bad_evaluation_prompts, "harmful_prompts")
        else:
            sets["harmful"] = load(evaluation.harmful_prompts, "harmful_prompts")
    if evaluation.over_refusal and evaluation.over_refusal_prompts is not None:
        sets["over_refusal"] = load(evaluation.over_refusal_prompts, "over_refusal_prompts")
    if evaluation.kl:
        spec = evaluation.damage_prompts or settings.good_evaluation_prompts
        sets["damage"] = load(spec, "damage_prompts")
    if evaluation.perplexity and evaluation.text_prompts is not None:
        sets["texts"] = load(evaluation.text_prompts, "text_prompts")
    return sets


def make_plan(settings: Settings, evaluation: EvaluationSettings, manifest: dict[str, Any],
              trial_rows: list[dict[str, Any]], judge_identity: dict[str, Any],
              trials: list[int] | None = None, top: int | None = None) -> EvaluationPlan:
    """Candidates, prompt sets and the evaluation key; bad input stops here, before any model load."""
    from ..engine.types import EvaluationRequest
    from ..search.space import decode_trial_params

    chosen = choose_trials(trial_rows, trials if trials is not None else evaluation.trials,
                           top if top is not None else evaluation.top)
    candidates = [Candidate(BASE_TRIAL, None, manifest.get("base_refusals"), 0.0)]
    for row in chosen:
        params = decode_trial_params(row["params"], manifest["n_layers"], settings.allow_mlp_off)
        candidates.append(Candidate(row["number"], params, row.get("refusals"), row.get("kl")))
    notes: list[str] = []
    sets = _load_sets(settings, evaluation, notes)
    hashes = {name: prompt_set_hash(p) for name, p in sets.items() if p}
    prefix = settings.response_prefix or ""
    key = evaluation_key(manifest["run_id"], evaluation, judge_identity, hashes, prefix)
    request = EvaluationRequest(key=key, harmful=sets["harmful"], over_refusal=sets["over_refusal"],
                                damage=sets["damage"], texts=[p.user for p in sets["texts"]],
                                max_response_length=evaluation.max_response_length, kl_tokens=evaluation.kl_tokens)
    if not any((request.harmful, request.over_refusal, request.damage, request.texts)):
        raise UserError("every evaluation measure is off or has no prompts: switch one on in [evaluation]")
    return EvaluationPlan(settings, evaluation, manifest["run_id"], key, request, candidates, notes)


BASE_COLUMNS = ("refusal_rate", "over_refusal_rate", "degenerate_rate", "perplexity")


class ResultWriter:
    """Writes each candidate's row (and its judged replies) as soon as it is measured: a killed
    evaluation keeps every row written before, and a rerun skips those candidates. evaluation.parquet
    holds one row per candidate, with the base model's values beside its own (`base_*` columns, filled
    in once the base model is measured); the base model's own row is in evaluation/base.parquet."""

    def __init__(self, run: st.RunDir, key: str):
        self.run, self.key = run, key
        self.rows = self._read(st.EVALUATION)
        self.bases = self._read(st.EVALUATION_BASE)
        self.replies = self._read(st.EVALUATION_REPLIES)

    def _read(self, name: str) -> list[dict[str, Any]]:
        return self.run.read_parquet(name) if self.run.exists(name) else []

    def _mine(self, row: dict[str, Any], trial: int | None = None) -> bool:
        return row["eval_key"] == self.key and (trial is None or row["trial"] == trial)

    def base(self) -> dict[str, Any] | None:
        return next((r for r in self.bases if self._mine(r)), None)

    def done(self) -> set[int]:
        return {r["trial"] for r in self.rows + self.bases if self._mine(r)}

    def add(self, row: dict[str, Any], replies: list[dict[str, Any]]) -> None:
        trial = row["trial"]
        self.replies = [r for r in self.replies if not self._mine(r, trial)] + replies
        self.run.write_parquet(st.EVALUATION_REPLIES, self.replies)
        if trial == BASE_TRIAL:
            self.bases = [r for r in self.bases if not self._mine(r)] + [row]
            self.run.write_parquet(st.EVALUATION_BASE, self.bases)
        else:
            self.rows = [r for r in self.rows if not self._mine(r, trial)] + [row]
        base = self.base()
        for r in self.rows:  # the base model's values beside each candidate's
            if self._mine(r):
                r.update({f"base_{c}": None if base is None else base.get(c) for c in BASE_COLUMNS})
        self.run.write_parquet(st.EVALUATION, self.rows)  # last: a row is there only with its replies

    def current(self) -> list[dict[str, Any]]:
        """This evaluation's rows for display: the base model's first, then the candidates by trial."""
        base = self.base()
        return ([base] if base else []) + sorted((r for r in self.rows if self._mine(r)), key=lambda r: r["trial"])


def judge_set(judge: Any, prompts: list[Prompt], replies: list[str], check_degenerate: bool,
              label: str) -> tuple[measures.ReplyCounts, list[dict[str, Any]]]:
    """Degenerate replies are found first and never judged; the rest go to the judge in one call."""
    found = [measures.degeneracy(r) if check_degenerate else measures.Degeneracy(False, "") for r in replies]
    ask = [i for i, d in enumerate(found) if not d.degenerate]
    verdicts = judge.judge([(prompts[i].user, replies[i]) for i in ask]) if ask else []
    refusal = [False] * len(replies)
    scores = [0.0] * len(replies)
    for i, verdict in zip(ask, verdicts):
        refusal[i], scores[i] = verdict.refusal, verdict.score
    counts = measures.count_replies(refusal, scores, [d.degenerate for d in found])
    detail = [{"set": label, "index": i, "prompt": prompts[i].user, "reply": replies[i],
               "refusal": None if found[i].degenerate else refusal[i],
               "score": None if found[i].degenerate else scores[i], "degenerate": found[i].reason or None}
              for i in range(len(replies))]
    return counts, detail


def measure_row(plan: EvaluationPlan, judge: Any, candidate: Candidate, result: EvaluationResult,
                worker_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Judge one candidate's replies and build its row and reply records."""
    request, check = plan.request, plan.evaluation.degenerate
    harmful = over = None
    details: list[dict[str, Any]] = []
    t = time.perf_counter()
    if request.harmful:
        harmful, rows = judge_set(judge, request.harmful, result.harmful_replies, check, "harmful")
        details += rows
    if request.over_refusal:
        over, rows = judge_set(judge, request.over_refusal, result.over_refusal_replies, check, "over_refusal")
        details += rows
    timings = dict(result.timings, judge_s=time.perf_counter() - t)
    result.timings = timings
    extra = {"judge": plan.evaluation.judge.name, "max_response_length": request.max_response_length,
             "kl_tokens": request.kl_tokens if request.damage else None, "worker_id": worker_id,
             "harmful_held_out": plan.evaluation.harmful_prompts is not None}
    row = candidate_row(plan.key, candidate, harmful, over, result, extra)
    for d in details:
        d.update(eval_key=plan.key, trial=candidate.trial)
    return row, details


def evaluate_on_pool(pool: Any, plan: EvaluationPlan, judge: Any, writer: ResultWriter,
                     say: Callable[[str], None]) -> list[int]:
    """Measure the plan's candidates that have no row yet, over all workers at once; returns them."""
    import ray

    from ..distributed.broker import PoolError

    done = writer.done()
    todo = [c for c in plan.candidates if c.trial not in done]
    if not todo:
        return []
    request_ref = ray.put(plan.request)  # one copy in the object store, resolved once per worker call
    width = max(1, min(pool.size(), len(todo)))
    evaluated: list[int] = []
    with ThreadPoolExecutor(max_workers=width, thread_name_prefix="evaluate") as threads:
        pending = {threads.submit(pool.run_sharded, "evaluate", [(c.params, request_ref)]): c for c in todo}
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                candidate = pending.pop(future)
                try:
                    sharded = future.result()
                except PoolError as error:
                    raise UserError(f"evaluating {candidate.label}: {error}") from None
                result = sharded.results[0]
                row, details = measure_row(plan, judge, candidate, result, sharded.worker_ids[0])
                writer.add(row, details)
                flush = getattr(judge, "flush", None)
                if flush:
                    flush()
                evaluated.append(candidate.trial)
                say(f"evaluated {candidate.label} ({len(evaluated)}/{len(todo)}): {summary_line(row)}")
    return evaluated


def summary_line(row: dict[str, Any]) -> str:
    parts = []
    if row.get("refusals") is not None:
        parts.append(f"refusals {row['refusals']}/{row['n_harmful']}")
    if row.get("over_refusals") is not None:
        parts.append(f"over-refusals {row['over_refusals']}/{row['n_over_refusal']}")
    if row.get("degenerate") is not None:
        parts.append(f"degenerate {row['degenerate']}")
    if row.get("kl") is not None:
        parts.append(f"KL@{row['kl_tokens']} {row['kl']:.4f}")
    if row.get("perplexity") is not None:
        parts.append(f"perplexity {row['perplexity']:.2f}")
    return ", ".join(parts) or "no measures"


def describe_plan(plan: EvaluationPlan, done: set[int]) -> str:
    r = plan.request
    sets = ", ".join(f"{name} {n}" for name, n in (("harmful", len(r.harmful)), ("over-refusal", len(r.over_refusal)),
                                                  ("damage", len(r.damage)), ("texts", len(r.texts))) if n)
    left = sum(c.trial not in done for c in plan.candidates)
    return (f"evaluation {plan.key}: {len(plan.candidates) - 1} candidates + the base model "
            f"({left} to measure, {len(plan.candidates) - left} already done); judge {plan.evaluation.judge.name}; "
            f"{r.max_response_length} tokens per reply; prompts: {sets}")


def evaluation_settings_json(evaluation: EvaluationSettings) -> str:
    return json.dumps(evaluation.model_dump(mode="json"), sort_keys=True)
