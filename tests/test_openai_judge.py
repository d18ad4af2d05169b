"""The openai judge against a real HTTP server on 127.0.0.1 (ThreadingHTTPServer in a thread)."""

from __future__ import annotations

import json
import pickle
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from heretic_dist.config.evaluation import JudgeSettings
from heretic_dist.errors import UserError
from heretic_dist.evaluation.cache import CachedJudge, JudgementCache
from heretic_dist.evaluation.judges import make_judge
from heretic_dist.evaluation.judges.openai import MAX_TOKENS, OpenAIJudge
from heretic_dist.rundir import RunDir

SECRET = "sk-test-DO-NOT-LEAK-123"
KEY_ENV = "HERETIC_TEST_JUDGE_KEY"
REFUSING = "I cannot help with that."
COMPLYING = "Sure! Why did the cat sit on the computer? To keep an eye on the mouse."


class FakeEndpoint:
    """POST /v1/chat/completions; `mode` picks the behaviour; counts requests and concurrency."""

    def __init__(self) -> None:
        self.mode = "normal"
        self.delay = 0.0
        self.fail_first = 0  # "flaky": this many HTTP 500 answers before normal ones
        self.required_key: str | None = None
        self.lock = threading.Lock()
        self.requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.auth: list[str | None] = []
        self.bodies: list[dict] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.server.handle_error = lambda request, address: None  # clients that timed out: broken pipes
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with endpoint.lock:
                    endpoint.requests += 1
                    n = endpoint.requests
                    endpoint.in_flight += 1
                    endpoint.max_in_flight = max(endpoint.max_in_flight, endpoint.in_flight)
                    endpoint.auth.append(self.headers.get("Authorization"))
                endpoint.bodies.append(json.loads(body))
                endpoint.answer(self, n)

        return Handler

    def answer(self, handler: BaseHTTPRequestHandler, n: int) -> None:
        content = self.bodies[-1]["messages"][0]["content"]
        mode = self.mode
        if handler.path != "/v1/chat/completions":
            return self.send(handler, 404, b'{"error": "no such route"}')
        if self.required_key is not None and handler.headers.get("Authorization") != f"Bearer {self.required_key}":
            return self.send(handler, 401, b'{"error": "invalid api key"}')
        if mode == "slow":
            time.sleep(1.0)
        if mode == "500" or (mode == "flaky" and n <= self.fail_first) or (mode == "poison" and "POISON" in content):
            return self.send(handler, 500, b"overloaded\nplease retry later")
        if mode == "404":
            return self.send(handler, 404, b'{"error": "model judge-model not found"}')
        if mode == "malformed":
            return self.send(handler, 200, b'{"choices": [ {"message": ')
        if mode == "missing":
            return self.send(handler, 200, b'{"choices": []}')
        time.sleep(self.delay)
        word = "Maybe, it depends." if mode == "garbage" else ("Yes." if "cannot" in content else "no")
        data = {"id": "x", "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": word}}]}
        self.send(handler, 200, json.dumps(data).encode())

    def send(self, handler: BaseHTTPRequestHandler, status: int, body: bytes) -> None:
        # A request stops counting as in flight before its answer is written: once the client has
        # the answer it may send its next request, which must not overlap this one in the count.
        with self.lock:
            self.in_flight -= 1
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def endpoint():
    server = FakeEndpoint()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(KEY_ENV, SECRET)
    return SECRET


def settings(url: str, **extra) -> JudgeSettings:
    base = dict(name="openai", url=url, model="judge-model", timeout_s=0.4, retries=2, concurrency=2,
                api_key_env=KEY_ENV)
    return JudgeSettings(**(base | extra))


def cached_judge(url: str, tmp_path: Path, **extra) -> tuple[CachedJudge, JudgementCache]:
    cache = JudgementCache(RunDir(str(tmp_path / "run")))
    return CachedJudge(OpenAIJudge(settings(url, **extra), [], backoff_s=0.005, max_backoff_s=0.02), cache), cache


def assert_one_line(error: UserError) -> str:
    text = str(error)
    assert "\n" not in text and "Traceback" not in text and text.strip() == text and text
    assert error.__cause__ is None and error.__suppress_context__
    assert SECRET not in text
    return text


def assert_no_secret_in_files(root: Path) -> None:
    files = [p for p in root.rglob("*") if p.is_file()]
    for path in files:
        assert SECRET.encode() not in path.read_bytes(), path


ITEMS = [("Tell me a joke", REFUSING), ("Tell me a joke about cats", COMPLYING),
         ("Write a poem about the sea", "The sea is wide and blue."), ("Explain how plants grow", REFUSING)]


def test_verdicts_in_order_and_key_only_in_header(endpoint: FakeEndpoint, tmp_path: Path) -> None:
    judge, cache = cached_judge(endpoint.url, tmp_path)
    verdicts = judge.judge(ITEMS)
    assert [v.refusal for v in verdicts] == [True, False, False, True]
    assert [v.score for v in verdicts] == [1.0, 0.0, 0.0, 1.0]
    assert endpoint.auth == [f"Bearer {SECRET}"] * 4
    body = endpoint.bodies[0]
    assert body["model"] == "judge-model" and body["temperature"] == 0 and body["max_tokens"] == MAX_TOKENS
    assert [m["role"] for m in body["messages"]] == ["user"]
    assert any(REFUSING in b["messages"][0]["content"] for b in endpoint.bodies)
    stats = judge.stats()
    assert stats["requests"] == 4 and stats["retries"] == 0 and stats["cache_misses"] == 4
    # a second call is served from the cache: no request
    assert judge.judge(ITEMS) == verdicts
    assert endpoint.requests == 4 and judge.stats()["cache_hits"] == 4
    # nothing secret in what the judge shows or writes
    for shown in (repr(judge), repr(judge.inner), json.dumps(judge.identity()), json.dumps(judge.stats())):
        assert SECRET not in shown
    assert SECRET.encode() not in pickle.dumps(judge.inner)
    assert (tmp_path / "run" / "evaluation" / "judgements.jsonl").exists()
    assert_no_secret_in_files(tmp_path)


def test_concurrency_bound_respected(endpoint: FakeEndpoint, tmp_path: Path) -> None:
    endpoint.delay = 0.1
    judge, _ = cached_judge(endpoint.url, tmp_path, concurrency=3)
    items = [(f"Tell me joke number {i}", COMPLYING) for i in range(9)]
    assert not any(v.refusal for v in judge.judge(items))
    assert endpoint.requests == 9 and endpoint.max_in_flight == 3


def test_thinking_is_not_sent_or_judged(endpoint: FakeEndpoint, tmp_path: Path) -> None:
    judge, _ = cached_judge(endpoint.url, tmp_path)
    reply = "<think>Maybe I cannot answer this.</think>Sure, here is a joke about a cat."
    (verdict,) = judge.judge([("Tell me a joke", reply)])
    assert not verdict.refusal
    assert "<think>" not in endpoint.bodies[0]["messages"][0]["content"]


@pytest.mark.parametrize("mode, fragment", [
    ("slow", "did not answer within 0.4 s"),
    ("500", "answered HTTP 500"),
    ("malformed", "not a chat completion (not JSON"),
    ("missing", "not a chat completion (no choices[0].message.content"),
    ("refused", "no OpenAI-compatible endpoint answers at URL: http://127.0.0.1:"),
])
def test_failures_retried_then_one_line(endpoint: FakeEndpoint, tmp_path: Path, mode: str, fragment: str) -> None:
    endpoint.mode = mode
    url = endpoint.url
    if mode == "refused":
        with socket.socket() as s:  # a port where nothing listens
            s.bind(("127.0.0.1", 0))
            url = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    judge, cache = cached_judge(url, tmp_path, timeout_s=0.4)
    start = time.monotonic()
    with pytest.raises(UserError) as caught:
        judge.judge([("Tell me a joke", REFUSING)])
    assert fragment in assert_one_line(caught.value)
    assert "3 tries" in str(caught.value)
    assert judge.stats()["retries"] == 2 and judge.stats()["failures"] == 1
    assert endpoint.requests == (0 if mode == "refused" else 3)
    assert len(cache) == 0 and not (tmp_path / "run" / "evaluation" / "judgements.jsonl").exists()
    assert time.monotonic() - start < 5
    assert_no_secret_in_files(tmp_path)


def test_flaky_endpoint_recovers_and_counts_retries(endpoint: FakeEndpoint, tmp_path: Path) -> None:
    endpoint.mode, endpoint.fail_first = "flaky", 2
    judge, _ = cached_judge(endpoint.url, tmp_path, concurrency=1)
    assert [v.refusal for v in judge.judge(ITEMS[:1])] == [True]
    assert judge.stats()["retries"] == 2 and endpoint.requests == 3


@pytest.mark.parametrize("mode, fragment", [("404", "answered HTTP 404"), ("garbage", "neither yes nor no")])
def test_final_answers_are_not_retried(endpoint: FakeEndpoint, tmp_path: Path, mode: str, fragment: str) -> None:
    endpoint.mode = mode
    judge, _ = cached_judge(endpoint.url, tmp_path)
    with pytest.raises(UserError) as caught:
        judge.judge([("Tell me a joke", COMPLYING)])
    assert fragment in assert_one_line(caught.value)
    assert endpoint.requests == 1 and judge.stats()["retries"] == 0


def test_401_names_the_env_var_and_never_the_key(endpoint: FakeEndpoint, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    endpoint.required_key = "sk-the-right-one"
    judge, _ = cached_judge(endpoint.url, tmp_path)
    with pytest.raises(UserError) as caught:
        judge.judge([("Tell me a joke", COMPLYING)])
    text = assert_one_line(caught.value)
    assert "HTTP 401" in text and KEY_ENV in text and "refused the API key" in text
    assert endpoint.requests == 1 and judge.stats()["retries"] == 0
    # without the variable: no Authorization header at all, and the message says what to set
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(UserError) as caught:
        judge.judge([("Tell me a joke", COMPLYING)])
    assert "needs an API key" in assert_one_line(caught.value) and KEY_ENV in str(caught.value)
    assert endpoint.auth[-1] is None
    # with the right key it works
    monkeypatch.setenv(KEY_ENV, "sk-the-right-one")
    assert [v.refusal for v in judge.judge([("Tell me a joke", COMPLYING)])] == [False]


def test_failed_call_caches_nothing_then_resume(endpoint: FakeEndpoint, tmp_path: Path) -> None:
    endpoint.mode = "poison"
    judge, cache = cached_judge(endpoint.url, tmp_path, concurrency=1, retries=0)
    items = [("Tell me a joke", COMPLYING), ("Tell me a joke", "POISON " + REFUSING), ("Tell me a joke", REFUSING)]
    with pytest.raises(UserError):
        judge.judge(items)
    assert len(cache) == 0 and not list((tmp_path / "run").rglob("*.jsonl"))
    endpoint.mode = "normal"
    first = judge.judge(items)
    assert [v.refusal for v in first] == [False, True, True]
    before = endpoint.requests
    # a new process (new cache object, same run dir) pays nothing
    again, _ = cached_judge(endpoint.url, tmp_path)
    assert again.judge(items) == first and endpoint.requests == before
    assert again.stats()["cache_hits"] == 3
    assert_no_secret_in_files(tmp_path)


def test_registry_makes_the_openai_judge(endpoint: FakeEndpoint, tmp_path: Path) -> None:
    cache = JudgementCache(RunDir(str(tmp_path / "run")))
    judge = make_judge(settings(endpoint.url), ["sorry"], "", cache=cache)
    assert isinstance(judge, CachedJudge) and isinstance(judge.inner, OpenAIJudge)
    identity = judge.identity()
    assert identity["name"] == "openai" and identity["model"] == "judge-model" and identity["url"] == endpoint.url
    assert SECRET not in json.dumps(identity)
    assert [v.refusal for v in judge.judge(ITEMS[:2])] == [True, False]


def test_credentials_in_the_url_are_redacted(tmp_path: Path) -> None:
    judge = OpenAIJudge(settings("http://user:pw-XYZ@127.0.0.1:9/v1"), [])
    assert "pw-XYZ" not in repr(judge) and "pw-XYZ" not in json.dumps(judge.identity())
