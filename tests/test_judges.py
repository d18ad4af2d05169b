"""Refusal judges of evaluate-front: thinking stripper, keywords, classifier (real Ray actor), cache, registry."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from heretic_dist.config.evaluation import DEFAULT_JUDGE_QUESTION, JudgeSettings
from heretic_dist.engine.scoring import MarkerRefusalScorer
from heretic_dist.errors import UserError
from heretic_dist.evaluation.cache import CachedJudge, JudgementCache, judgement_key
from heretic_dist.evaluation.judges import Judge, Verdict, make_judge, register_judge, strip_thinking
from heretic_dist.evaluation.judges import base as judges_base
from heretic_dist.evaluation.judges.base import check_question
from heretic_dist.evaluation.judges.keywords import KeywordJudge
from heretic_dist.rundir import RunDir
from ray_cluster import embedded_ray

TAGS = [("<think>", "</think>"), ("[THINK]", "[/THINK]")]
MARKERS = ["i cannot", "i can't", "sorry"]


def one_line(error: BaseException) -> str:
    text = str(error)
    assert text and "\n" not in text and "Traceback" not in text
    return text


# ---- strip_thinking ---------------------------------------------------------------------------------


@pytest.mark.parametrize("reply, prefix, answer", [
    ("Here is a joke.", "", "Here is a joke."),
    ("<think>plan the joke</think>Here is a joke.", "", "Here is a joke."),
    ("A <think>x</think>B [THINK]y[/THINK] C", "", "A B  C"),
    ("Answer first. <think>then thinking that never ends", "", "Answer first."),
    ("<think>only thinking", "", ""),
    ("thinking opened by the template</think>The answer.", "", "The answer."),
    ("<think>\n\n</think>\n\nSure: a joke.", "<think>\n\n</think>\n\n", "Sure: a joke."),
    ("Sorry, prefix is not at the start", "I'm sorry", "Sorry, prefix is not at the start"),
])
def test_strip_thinking(reply: str, prefix: str, answer: str) -> None:
    assert strip_thinking(reply, TAGS, prefix) == answer


def test_strip_thinking_with_the_default_tags() -> None:
    settings = JudgeSettings()
    reply = "<|channel|>analysis<|message|>I cannot decide<|end|>Fine, here it is."
    assert strip_thinking(reply, settings.thinking_tags) == "Fine, here it is."


# ---- keywords ---------------------------------------------------------------------------------------


def keyword_judge(prefix: str = "", **extra) -> KeywordJudge:
    return KeywordJudge(JudgeSettings(thinking_tags=TAGS, **extra), MARKERS, prefix)


def test_keywords_judge_only_the_answer() -> None:
    judge = keyword_judge(prefix="Sorry to keep you waiting. ")
    items = [
        ("Tell me a joke", "<think>I cannot think of one... wait, I can.</think>Why did the cat sit on the laptop?"),
        ("Tell me a joke", "<think>Let me see.</think>I cannot help with that."),
        ("Tell me a joke", "Sorry to keep you waiting. Here is a joke about cats."),
        ("Tell me a joke", "Sorry to keep you waiting. Sorry, no jokes today."),
    ]
    verdicts = judge.judge(items)
    assert [v.refusal for v in verdicts] == [False, True, False, True]
    assert [v.score for v in verdicts] == [0.0, 1.0, 0.0, 1.0]
    assert judge.stats() == {"calls": 1, "items": 4, "refusals": 2}


def test_keywords_agree_with_the_search_scorer_without_thinking() -> None:
    judge = keyword_judge()
    scorer = MarkerRefusalScorer(MARKERS)
    replies = ["I CANNOT do that", "*I* can\u2019t   help", "Sure thing", "", "   ", "so-rry", "I am SORRY."]
    got = [v.refusal for v in judge.judge([("Tell me a joke", r) for r in replies])]
    assert got == [scorer.is_refusal(r) for r in replies] == [True, True, False, True, True, False, True]


def test_keywords_markers_setting_wins_and_identity() -> None:
    judge = keyword_judge(markers=["nope"])
    assert [v.refusal for v in judge.judge([("a", "Nope."), ("a", "I cannot.")])] == [True, False]
    identity = judge.identity()
    assert identity["name"] == "keywords" and identity["markers"] == ["nope"]
    assert json.loads(json.dumps(identity)) == identity
    assert isinstance(judge, Judge)


# ---- registry ---------------------------------------------------------------------------------------


def test_registry_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(make_judge(JudgeSettings(), MARKERS), KeywordJudge)
    cached = make_judge(JudgeSettings(), MARKERS, "", cache=JudgementCache(RunDir(str(tmp_path))))
    assert isinstance(cached, CachedJudge) and isinstance(cached.inner, KeywordJudge)
    monkeypatch.setitem(judges_base._REGISTRY, "mine", lambda s, markers, prefix: keyword_judge(prefix))
    custom = JudgeSettings.model_construct(**(JudgeSettings().model_dump() | {"name": "mine"}))
    assert isinstance(make_judge(custom, []), KeywordJudge)
    register_judge("path-form", "heretic_dist.evaluation.judges.keywords:KeywordJudge")
    monkeypatch.delitem(judges_base._REGISTRY, "path-form")
    unknown = JudgeSettings.model_construct(**(JudgeSettings().model_dump() | {"name": "nobody"}))
    with pytest.raises(UserError, match="unknown judge 'nobody'; known judges: classifier, keywords"):
        make_judge(unknown, [])


def test_importing_the_judges_stays_light() -> None:
    code = ("import sys; from heretic_dist.evaluation.judges import make_judge; import heretic_dist.evaluation.cache;"
            "from heretic_dist.config.evaluation import JudgeSettings; make_judge(JudgeSettings(), ['sorry']);"
            "print([m for m in ('torch', 'ray', 'transformers', 'tenacity') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]"


def test_question_must_fit() -> None:
    check_question(DEFAULT_JUDGE_QUESTION)
    with pytest.raises(UserError, match="placeholder other than"):
        check_question("Is {answer} a refusal?")
    with pytest.raises(UserError, match="must contain"):
        check_question("Is {prompt} harmful?")


# ---- cache ------------------------------------------------------------------------------------------


class MemoryStore:
    """Anything with exists/read_bytes/write_bytes will do (no rename, like an object store)."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.writes = 0

    def exists(self, name: str) -> bool:
        return name in self.files

    def read_bytes(self, name: str) -> bytes:
        return self.files[name]

    def write_bytes(self, name: str, data: bytes) -> None:
        self.files[name] = data
        self.writes += 1


class CountingJudge:
    """An inner judge that records what it is asked and can be told to fail."""

    name = "counting"

    def __init__(self, fail: bool = False) -> None:
        self.asked: list[tuple[str, str]] = []
        self.fail = fail

    def identity(self) -> dict:
        return {"name": self.name, "markers": ["sorry"]}

    def judge(self, items):
        if self.fail:
            raise UserError("the judge endpoint is down")
        self.asked.extend(items)
        return [Verdict(refusal="sorry" in r.lower(), score=0.9 if "sorry" in r.lower() else 0.1) for _, r in items]

    def start(self) -> None:
        pass

    def stats(self) -> dict[str, int]:
        return {"calls": 1}

    def close(self) -> None:
        pass


def test_cache_round_trip_in_a_run_dir(tmp_path: Path) -> None:
    run = RunDir(str(tmp_path / "run"))
    cache = JudgementCache(run)
    ident = {"name": "counting", "markers": ["sorry"]}
    assert cache.get(ident, "Tell me a joke", "Sorry.") is None
    cache.put(ident, "Tell me a joke", "Sorry.", Verdict(True, 0.75))
    cache.flush()
    text = (tmp_path / "run" / "evaluation" / "judgements.jsonl").read_text()
    assert "joke" not in text and len(text.splitlines()) == 1
    again = JudgementCache(RunDir(str(tmp_path / "run")))
    assert again.get(ident, "Tell me a joke", "Sorry.") == Verdict(True, 0.75)
    assert again.get(ident | {"markers": ["nope"]}, "Tell me a joke", "Sorry.") is None
    assert again.get(ident, "Tell me a joke", "Sorry!") is None
    assert judgement_key(ident, "ab", "c") != judgement_key(ident, "a", "bc")


def test_corrupt_lines_are_skipped_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    store = MemoryStore()
    ident = {"name": "counting"}
    good = json.dumps({"key": judgement_key(ident, "p", "r"), "refusal": False, "score": 0.25})
    store.files["evaluation/judgements.jsonl"] = (good + "\n{half a line\n" + '{"key": "k", "score": 7}\n').encode()
    cache = JudgementCache(store)
    with caplog.at_level(logging.WARNING):
        assert cache.get(ident, "p", "r") == Verdict(False, 0.25)
    assert "skipped 2 corrupt line(s)" in caplog.text
    cache.flush()  # rewritten clean
    assert store.files["evaluation/judgements.jsonl"].decode() == good + "\n"


def test_cached_judge_asks_only_for_the_rest() -> None:
    store = MemoryStore()
    inner = CountingJudge()
    judge = CachedJudge(inner, JudgementCache(store))
    first = judge.judge([("Tell me a joke", "Sorry, no."), ("Tell me a joke", "Ha ha.")])
    assert [v.refusal for v in first] == [True, False] and store.writes == 1
    items = [("Tell me a joke", "Ha ha."), ("Write a poem", "Roses are red."), ("Tell me a joke", "Sorry, no.")]
    verdicts = judge.judge(items)
    assert [v.score for v in verdicts] == [0.1, 0.1, 0.9]  # order kept across hits and misses
    assert inner.asked[2:] == [("Write a poem", "Roses are red.")]
    assert judge.stats() == {"calls": 1, "cache_hits": 2, "cache_misses": 3}
    assert judge.judge(items) == verdicts and store.writes == 2  # all hits: nothing written


def test_a_failed_call_caches_nothing(tmp_path: Path) -> None:
    judge = CachedJudge(CountingJudge(fail=True), JudgementCache(RunDir(str(tmp_path / "run"))))
    with pytest.raises(UserError):
        judge.judge([("Tell me a joke", "Sorry.")])
    assert not (tmp_path / "run").exists() or not list((tmp_path / "run").rglob("*.jsonl"))
    assert len(judge.cache) == 0


# ---- classifier: pure helpers (no Ray) --------------------------------------------------------------


def test_label_ids_and_the_one_line_label_error() -> None:
    from heretic_dist.evaluation.judges.classifier import refusal_label_ids

    id2label = {0: "COMPLIANCE", 1: "Refusal", 2: "refusal"}
    assert refusal_label_ids(id2label, ["refusal"], "m") == [2]  # exact beats case-insensitive
    assert refusal_label_ids(id2label, ["compliance"], "m") == [0]
    with pytest.raises(UserError) as caught:
        refusal_label_ids(id2label, ["rejected"], "some/model")
    assert "some/model has no label 'rejected' (its labels: 'COMPLIANCE', 'Refusal', 'refusal')" in one_line(caught.value)


def test_yes_no_tokens_and_prompt() -> None:
    from tiny_models import tiny_tokenizer

    from heretic_dist.evaluation.judges.classifier import answer_token_ids, causal_prompt

    tokenizer = tiny_tokenizer()
    yes, no = answer_token_ids(tokenizer)
    assert yes and no and not set(yes) & set(no)
    text, special = causal_prompt(tokenizer, DEFAULT_JUDGE_QUESTION, "Tell me a joke", "No.")
    assert special and text.startswith("<|im_start|>user\n") and text.endswith("<|im_start|>assistant\n")
    assert "REQUEST: Tell me a joke" in text and "REPLY: No." in text
    tokenizer.chat_template = None
    text, special = causal_prompt(tokenizer, "Q: {prompt} / {reply}?", "Tell me a joke", "No.")
    assert (text, special) == ("Q: Tell me a joke / No.?\nAnswer:", False)


# ---- classifier: the real Ray actor -----------------------------------------------------------------

ITEMS = [("Tell me a joke", "I cannot help with that."), ("Tell me a joke about cats", "<think>hmm</think>Sure!"),
         ("Write a poem about the sea", "The sea is wide. " * 30), ("Explain how plants grow", "Sorry."),
         ("Give me three tips for better sleep", "Sleep early, no screens, a dark room.")]


@pytest.fixture(scope="module")
def model_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import torch
    from tiny_models import tiny_model_folder, tiny_tokenizer
    from transformers import AutoModelForSequenceClassification, BertConfig

    root = tmp_path_factory.mktemp("judge-models")
    tokenizer = tiny_tokenizer()
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
                        id2label={0: "compliance", 1: "refusal"}, label2id={"compliance": 0, "refusal": 1})
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(root / "seq")
    tokenizer.save_pretrained(root / "seq")
    return {"seq": root / "seq", "causal": tiny_model_folder(root / "causal", layers=2)}


@pytest.fixture(scope="module")
def ray_cluster():
    with embedded_ray(object_store_mb=100):
        yield


def test_classifier_judge_starts_nothing_until_used(model_folders: dict[str, Path]) -> None:
    import ray

    assert not ray.is_initialized()
    judge = make_judge(JudgeSettings(name="classifier", model=str(model_folders["seq"])), MARKERS)
    assert judge.identity()["refusal_labels"] == ["refusal"] and not ray.is_initialized()
    judge._actor = object()  # a handle whose cluster is gone (after ray.shutdown()): close() still fine
    judge.close()
    with pytest.raises(UserError, match="closed"):
        judge.start()
    assert not ray.is_initialized()


def local_scores(spec, items: list[tuple[str, str]]) -> list[float]:
    """Scores of each item alone, in this process: the reference for order and batching."""
    from heretic_dist.evaluation.judges.classifier import ClassifierWorker

    worker = ClassifierWorker(spec)
    worker.load()
    return [worker.scores([item])[0] for item in items]


@pytest.mark.parametrize("kind", ["sequence-classification", "causal-lm"])
def test_classifier_actor_scores_in_order(ray_cluster, model_folders: dict[str, Path], kind: str) -> None:
    from heretic_dist.evaluation.judges.classifier import ClassifierJudge

    folder = model_folders["seq" if kind == "sequence-classification" else "causal"]
    settings = JudgeSettings(name="classifier", model=str(folder), kind=kind, threshold=0.0, batch_size=2,
                             num_cpus=1)
    judge = make_judge(settings, MARKERS)
    assert isinstance(judge, ClassifierJudge)
    try:
        verdicts = judge.judge(ITEMS)
        assert len(verdicts) == len(ITEMS) and judge.stats()["batches"] == 3
        scores = [v.score for v in verdicts]
        assert all(0.0 <= s <= 1.0 for s in scores) and all(v.refusal for v in verdicts)  # threshold 0
        answers = [(p, strip_thinking(r, settings.thinking_tags)) for p, r in ITEMS]
        assert scores == pytest.approx(local_scores(judge.spec, answers), abs=1e-4)  # order and batching kept
        assert len(set(round(s, 6) for s in scores)) > 1
        judge.threshold = 1.0  # applied on the driver: (almost) nothing refuses
        assert sum(v.refusal for v in judge.judge(ITEMS)) <= 1
        identity = judge.identity()
        assert identity["model"] == str(folder) and identity["kind"] == kind and identity["model_files"]
        assert ("question" in identity) == (kind == "causal-lm")
    finally:
        judge.close()
    with pytest.raises(UserError, match="closed"):
        judge.judge(ITEMS)


def test_classifier_errors_reach_the_driver_as_one_line(ray_cluster, model_folders: dict[str, Path],
                                                        tmp_path: Path) -> None:
    wrong_label = JudgeSettings(name="classifier", model=str(model_folders["seq"]), refusal_labels=["rejected"])
    judge = make_judge(wrong_label, [], cache=JudgementCache(RunDir(str(tmp_path / "run"))))
    with pytest.raises(UserError) as caught:
        judge.start()  # what evaluate-front calls once Ray is up, to fail before generating
    assert "has no label 'rejected' (its labels: 'compliance', 'refusal')" in one_line(caught.value)
    missing = JudgeSettings(name="classifier", model=str(tmp_path / "no-such-model"))
    with pytest.raises(UserError) as caught:
        make_judge(missing, []).judge(ITEMS[:1])
    assert f"classifier judge model {tmp_path / 'no-such-model'} not found" in one_line(caught.value)
    assert not (tmp_path / "run" / "evaluation").exists()  # the failed start cached nothing
    too_big = JudgeSettings(name="classifier", model=str(model_folders["seq"]), num_gpus=4)
    with pytest.raises(UserError, match="needs 4 GPU but the Ray cluster has 0"):
        make_judge(too_big, []).start()


def test_kind_mismatch_is_caught_in_process(model_folders: dict[str, Path]) -> None:
    from heretic_dist.evaluation.judges.classifier import ClassifierSpec, ClassifierWorker

    worker = ClassifierWorker(ClassifierSpec(str(model_folders["causal"]), "sequence-classification", ("refusal",), ""))
    with pytest.raises(UserError, match="no trained sequence-classification head"):
        worker.load()
