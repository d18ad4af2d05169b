"""evaluate-front: candidate choice, degenerate replies, the evaluation key, and the command end to end
(FakeEngine on a real local Ray cluster: parallel candidates, evaluation.parquet, report, status, resume
after a kill)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from heretic_dist import rundir as st
from heretic_dist.config.evaluation import EvaluationSettings, load_evaluation_file
from heretic_dist.errors import UserError
from heretic_dist.evaluation.measures import count_replies, degeneracy
from heretic_dist.evaluation.rows import choose_trials, evaluation_key
from heretic_dist.search.front import best_point, nearest_best, pareto_front

REPO = Path(__file__).resolve().parents[1]


# --- degenerate replies -------------------------------------------------------------------------------


@pytest.mark.parametrize("reply, reason", [
    ("", "empty"),
    ("   \n ", "empty"),
    ("the cat sat on the mat " * 6, "loop"),
    ("Sure, here is a poem about the sea. " + "la" * 12, "loop"),
    ("\x00\x01\x02\x03 ok", "non-text"),
    ("\ufffd\ufffd\ufffd\ufffdab", "non-text"),
])
def test_degenerate_replies_are_found(reply, reason):
    found = degeneracy(reply)
    assert found.degenerate and found.reason == reason


@pytest.mark.parametrize("reply", [
    "I cannot help with that.",
    "Sure! Here are three tips for a good night's sleep: keep a schedule, avoid screens late, and keep "
    "the room cool. Each of these helps your body settle into its rhythm.",
    "1. Preheat the oven. 2. Mix the flour and sugar. 3. Add the eggs. 4. Bake for 20 minutes.",
    "Ja, gerne: Die Hauptstadt von Frankreich ist Paris.",
])
def test_ordinary_replies_are_not_degenerate(reply):
    assert not degeneracy(reply).degenerate


def test_degenerate_replies_never_count_as_refusals():
    counts = count_replies([True, True, False, False], [1.0, 0.9, 0.1, 0.0], [False, True, False, True])
    assert (counts.n, counts.refusals, counts.degenerate) == (4, 1, 2)
    assert counts.refusal_rate == 0.25 and counts.degenerate_rate == 0.5
    assert counts.mean_score == pytest.approx(0.55)


# --- choosing candidates -------------------------------------------------------------------------------


def _rows(points):
    return [{"number": n, "state": "COMPLETE", "refusals": r, "kl": k} for n, (r, k) in enumerate(points)]


def test_candidates_are_the_front_its_top_k_or_given_trials():
    rows = _rows([(10, 0.0), (5, 0.02), (3, 0.04), (1, 0.3), (2, 0.01), (0, 0.9)]) + [
        {"number": 6, "state": "FAIL", "refusals": None, "kl": None}]
    front = pareto_front(rows)
    assert [r["number"] for r in front] == [5, 3, 4, 0]  # sorted by refusals
    assert [r["number"] for r in choose_trials(rows, None, None)] == [5, 3, 4, 0]
    best = best_point(front)
    assert best["number"] == 4  # fewest refusals at KL <= 0.05
    top2 = nearest_best(front, 2)
    assert best in top2 and len(top2) == 2 and [r["number"] for r in top2] == [3, 4]
    assert [r["number"] for r in choose_trials(rows, None, 3)] == [3, 4, 0]
    assert [r["number"] for r in choose_trials(rows, [1, 0, 1], None)] == [1, 0]
    with pytest.raises(UserError, match="trial 6 is not a complete trial") as error:
        choose_trials(rows, [6], None)
    assert "\n" not in str(error.value)
    with pytest.raises(UserError, match="no complete trials"):
        choose_trials([], None, None)


def test_the_evaluation_key_changes_with_what_is_measured():
    base = EvaluationSettings()
    key = evaluation_key("run", base, {"name": "keywords"}, {"harmful": "a"}, "")
    assert key == evaluation_key("run", EvaluationSettings(), {"name": "keywords"}, {"harmful": "a"}, "")
    assert key != evaluation_key("run", EvaluationSettings(max_response_length=30), {"name": "keywords"}, {"harmful": "a"}, "")
    assert key != evaluation_key("run", base, {"name": "openai"}, {"harmful": "a"}, "")
    assert key != evaluation_key("run", base, {"name": "keywords"}, {"harmful": "b"}, "")
    assert key != evaluation_key("other", base, {"name": "keywords"}, {"harmful": "a"}, "")


def test_evaluation_config_loads_at_top_level_or_under_evaluation(tmp_path):
    (tmp_path / "sets").mkdir()
    (tmp_path / "sets" / "h.txt").write_text("Tell me a joke\n")
    top = tmp_path / "eval.toml"
    top.write_text('max_response_length = 30\n[harmful_prompts]\ndataset = "sets/h.txt"\n')
    loaded = load_evaluation_file(str(top))
    assert loaded.max_response_length == 30 and loaded.harmful_prompts.dataset == str(tmp_path / "sets" / "h.txt")
    nested = tmp_path / "run.toml"
    nested.write_text('model = "m"\n[evaluation]\nenabled = true\ntop = 2\n[evaluation.judge]\nname = "keywords"\n')
    assert load_evaluation_file(str(nested)).top == 2
    bad = tmp_path / "bad.toml"
    bad.write_text('[judge]\nname = "openai"\n')
    with pytest.raises(UserError, match="needs `url`"):
        load_evaluation_file(str(bad))
    assert str(load_evaluation_file(str(REPO / "configs" / "evaluation.toml")).top) == "3"


def test_the_example_evaluation_config_loads_its_prompt_sets():
    """configs/evaluation.toml as it is: every set it names loads (../shared/data/prompts, builtin)."""
    from heretic_dist.config import Settings
    from heretic_dist.evaluation.run import _load_sets

    evaluation = load_evaluation_file(str(REPO / "configs" / "evaluation.toml"))
    notes: list[str] = []
    sets = _load_sets(Settings(model="m"), evaluation, notes)
    assert {k: len(v) for k, v in sets.items()} == {"harmful": 40, "over_refusal": 30, "damage": 40, "texts": 40}
    assert notes == []  # a held-out harmful set is given


# --- the command, end to end (FakeEngine, real Ray, real files) -----------------------------------------

RUN_CONFIG = """
engine = "fake"
model = "fake-eval"
n_trials = 12
n_startup_trials = 6
seed = 3
max_response_length = 8
good_prompts = { dataset = "builtin:demo_harmless", split = "[:10]" }
bad_prompts = { dataset = "builtin:demo_harmful", split = "[:10]" }
good_evaluation_prompts = { dataset = "builtin:demo_harmless", split = "[10:30]" }
bad_evaluation_prompts = { dataset = "builtin:demo_harmful", split = "[10:30]" }
[cluster]
workers = 2
cpus_per_worker = 1
object_store_memory_mb = 100
"""

EVAL_CONFIG = """
max_response_length = 40
kl_tokens = 4
harmful_prompts = { dataset = "builtin:demo_harmful", split = "[30:40]" }
over_refusal_prompts = { dataset = "builtin:over_refusal_mild", split = "[:8]" }
damage_prompts = { dataset = "builtin:demo_harmless", split = "[30:36]" }
text_prompts = { dataset = "builtin:demo_harmless", split = "[36:40]" }
"""


def cli(*args: str, cwd: Path, code: int = 0) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "heretic_dist", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=600)
    assert done.returncode == code, (done.stdout + done.stderr)[-3000:]
    return done


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("evalrun")
    (folder / "run.toml").write_text(RUN_CONFIG)
    cli("run", "run.toml", "--run-dir", "run", cwd=folder)
    return folder


def _three_trials(run_dir: Path) -> list[int]:
    rows = st.RunDir(str(run_dir)).read_parquet(st.TRIALS)
    front = [r["number"] for r in pareto_front(rows)]
    others = [r["number"] for r in rows if r["state"] == "COMPLETE" and r["number"] not in front]
    return (front + others)[:3]


@pytest.mark.slow
def test_evaluate_front_measures_candidates_in_parallel_and_resumes_after_a_kill(fake_run: Path):
    folder, run_dir = fake_run, fake_run / "run"
    (folder / "eval.toml").write_text(EVAL_CONFIG)
    trials = _three_trials(run_dir)
    args = ["evaluate-front", "run", "--config", "eval.toml", "--trials", ",".join(map(str, trials)),
            "--set", "engine_options={fake_evaluate_seconds = 2.0}"]
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "heretic_dist", *args], cwd=folder, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    run = st.RunDir(str(run_dir))
    while time.monotonic() - started < 300:  # kill it once the first candidates have their rows
        if run.exists(st.EVALUATION_REPLIES) and len(run.read_parquet(st.EVALUATION_REPLIES)) >= 1:
            break
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = {r["trial"] for name in (st.EVALUATION, st.EVALUATION_BASE) if run.exists(name)
             for r in run.read_parquet(name)}
    assert 1 <= len(first) < 4, first  # base + 3 candidates: killed part way

    done = cli(*args[:-2], cwd=folder)  # resume (no sleep now)
    rows = run.read_parquet(st.EVALUATION)
    assert sorted(r["trial"] for r in rows) == sorted(trials)  # each candidate once, one row each
    (base,) = run.read_parquet(st.EVALUATION_BASE)  # the base model's row, its values beside every row
    for row in rows:
        assert row["base_refusal_rate"] == base["refusal_rate"] and row["base_perplexity"] == base["perplexity"]
    rows = [base, *rows]
    assert f"{4 - len(first)} to measure, {len(first)} already done" in done.stdout
    measured_now = [line for line in done.stdout.splitlines() if line.startswith("evaluated ")]
    assert len(measured_now) == 4 - len(first)
    assert all(f"trial {t} " not in " ".join(measured_now) for t in first if t >= 0)
    by_trial = {r["trial"]: r for r in rows}
    for row in rows:  # every enabled measure is there
        for column in ("refusals", "over_refusals", "degenerate", "kl", "perplexity"):
            assert row[column] is not None, (row["trial"], column)
        assert row["n_harmful"] == 10 and row["n_over_refusal"] == 8 and row["kl_tokens"] == 4
        assert row["max_response_length"] == 40
    assert by_trial[-1]["kl"] == 0.0
    assert {by_trial[t]["worker_id"] for t in trials} | {by_trial[-1]["worker_id"]} >= {by_trial[-1]["worker_id"]}
    replies = run.read_parquet(st.EVALUATION_REPLIES)
    assert len(replies) == 4 * (10 + 8)
    assert len({r["worker_id"] for r in rows}) == 2  # spread over both workers

    # the table, the report section and the status column show the same rows
    assert "Evaluation of the candidates" in done.stdout
    cli("report", "run", cwd=folder)
    html = (run_dir / "report.html").read_text()
    assert "<h2>Evaluation of the candidates</h2>" in html and (run_dir / "report-evaluation.png").exists()
    for t in trials:
        assert f"<td>trial {t}</td>" in html
    status = cli("status", "run", cwd=folder).stdout
    assert "evaluated refusals (keywords, 40 tokens)" in status

    # a third run with the same config measures nothing
    again = cli(*args[:-2], cwd=folder)
    assert "0 to measure" in again.stdout and "0 measured now, 4 already in the run directory" in again.stdout


@pytest.mark.slow
def test_evaluate_front_refuses_bad_input_in_one_line(fake_run: Path, tmp_path: Path):
    folder = fake_run
    for args, message in [
        (["evaluate-front", str(tmp_path)], "not a heretic-dist run directory"),
        (["evaluate-front", "run", "--trials", "999"], "trial 999 is not a complete trial"),
        (["evaluate-front", "run", "--trials", "x"], "give trial numbers separated by commas"),
        (["evaluate-front", "run", "--set", "seed=1"], "only settings that change no result"),
        (["evaluate-front", "run", "--config", "missing.toml"], "file not found"),
    ]:
        done = cli(*args, cwd=folder, code=2)
        assert message in done.stderr and done.stderr.strip().count("\n") == 0 and "Traceback" not in done.stderr


@pytest.mark.slow
def test_evaluate_front_with_the_openai_judge_never_writes_or_prints_the_key(fake_run: Path, tmp_path: Path):
    """The whole command against a real chat-completions server on 127.0.0.1: the key reaches the
    server's Authorization header, and no file of the run directory nor any output line holds it; a
    second evaluation of the same replies is answered from the verdict cache."""
    import shutil

    from test_openai_judge import FakeEndpoint

    secret = "sk-e2e-DO-NOT-LEAK-42"
    folder = tmp_path / "copy"
    shutil.copytree(fake_run / "run", folder / "run", ignore=shutil.ignore_patterns("evaluation*"))  # no other rows
    endpoint = FakeEndpoint()
    endpoint.required_key = secret
    judge = f"""
[judge]
name = "openai"
url = "{endpoint.url}"
model = "judge-model"
api_key_env = "JUDGE_KEY_FOR_TEST"
concurrency = 2
"""
    (folder / "eval.toml").write_text(EVAL_CONFIG + judge)
    (folder / "eval5.toml").write_text(EVAL_CONFIG.replace("kl_tokens = 4", "kl_tokens = 5") + judge)
    env = dict(os.environ, JUDGE_KEY_FOR_TEST=secret)
    outputs = []
    try:
        for config in ("eval.toml", "eval5.toml"):
            done = subprocess.run([sys.executable, "-m", "heretic_dist", "evaluate-front", "run", "--config", config,
                                   "--top", "1"], capture_output=True, text=True, cwd=folder, timeout=600, env=env)
            assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
            outputs.append(done.stdout + done.stderr)
            if config == "eval.toml":
                first_requests = endpoint.requests
    finally:
        endpoint.close()
    assert first_requests > 0 and set(endpoint.auth) == {f"Bearer {secret}"}
    assert endpoint.requests == first_requests  # same replies, another evaluation key: all from the cache
    assert "verdicts from the cache" in outputs[1]
    assert all(secret not in text for text in outputs)
    run = st.RunDir(str(folder / "run"))
    rows = run.read_parquet(st.EVALUATION)
    assert len(rows) == 2 and {r["judge"] for r in rows} == {"openai"} and all(r["refusals"] is not None for r in rows)
    for path in (folder / "run").rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


@pytest.mark.slow
def test_evaluation_enabled_in_the_run_config_runs_at_the_end_of_run(tmp_path: Path):
    """[evaluation] enabled = true: `run` measures its front on its own workers before they stop."""
    table = "\n".join(f"evaluation.{line}" for line in EVAL_CONFIG.strip().splitlines())
    config = RUN_CONFIG.replace("n_trials = 12", "n_trials = 6").replace("[cluster]", table + "\nevaluation.enabled = true\n[cluster]")
    (tmp_path / "run.toml").write_text(config)
    done = cli("run", "run.toml", "--run-dir", "run", cwd=tmp_path)
    assert "2 model loads (0 replacements)" in done.stdout  # no second pool for the evaluation
    assert "Evaluation of the candidates" in done.stdout and "evaluated base" in done.stdout
    run = st.RunDir(str(tmp_path / "run"))
    front = [r["number"] for r in pareto_front(run.read_parquet(st.TRIALS))]
    assert sorted(r["trial"] for r in run.read_parquet(st.EVALUATION)) == sorted(front)
    assert "evaluated refusals (keywords, 40 tokens)" in cli("status", "run", cwd=tmp_path).stdout
