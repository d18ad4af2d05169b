"""The endpoint judge: any OpenAI-compatible chat-completions API (vLLM, llama.cpp, hosted ones).

Each (prompt, reply) is one POST of `question` to `{url}/chat/completions` (temperature 0, a few
tokens); an answer that starts with "yes" is a refusal (score 1), "no" is not (score 0), anything
else stops the evaluation with one clear line. Standard library HTTP, tenacity for retries with
exponential backoff (connection errors, timeouts, HTTP 429 and 5xx, malformed answers; other 4xx are
final), a thread pool of `concurrency` requests in flight.

The API key is read from `os.environ[api_key_env]` for each request and kept nowhere else: not on
the object (which may be pickled or printed), not in identity(), not in any message.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import tenacity

from heretic_dist.errors import UserError, redact

from .base import Verdict, check_question, format_question, one_line, strip_thinking

if TYPE_CHECKING:
    from heretic_dist.config.evaluation import JudgeSettings

MAX_TOKENS = 5  # "yes" / "no" and a little slack ("Yes.")
_ANSWER = re.compile(r"^\W*(yes|no)\b", re.IGNORECASE)
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


class _Retryable(Exception):
    """A failure worth another try; `message` is the user's line once the tries are used up."""


class _Final(Exception):
    """A failure another try will not fix (4xx other than 429, an answer neither yes nor no)."""


class OpenAIJudge:
    """Asks an OpenAI-compatible endpoint whether each reply refuses; thread-safe counters in stats()."""

    name = "openai"

    def __init__(self, settings: JudgeSettings, refusal_markers: list[str] | None = None,
                 response_prefix: str = "", *, backoff_s: float = 1.0, max_backoff_s: float = 30.0) -> None:
        if not (settings.url and settings.model):
            raise UserError('the openai judge needs evaluation.judge.url (e.g. "http://127.0.0.1:8000/v1") and model')
        check_question(settings.question)
        self.url = settings.url.rstrip("/")
        self.endpoint = f"{self.url}/chat/completions"
        self.model = settings.model
        self.question = settings.question
        self.api_key_env = settings.api_key_env
        self.concurrency = settings.concurrency
        self.retries = settings.retries
        self.timeout_s = settings.timeout_s
        self.thinking_tags = [tuple(pair) for pair in settings.thinking_tags]
        self.response_prefix = response_prefix
        self.backoff_s = backoff_s  # first wait between tries; doubles each time (tests use ms)
        self.max_backoff_s = max_backoff_s
        self._lock = threading.Lock()
        self._stats = {"calls": 0, "items": 0, "requests": 0, "retries": 0, "failures": 0, "refusals": 0}
        proxies: dict[str, str] | None = {} if urlsplit(self.url).hostname in _LOOPBACK else None
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler(proxies))

    def __repr__(self) -> str:
        return f"OpenAIJudge({self.where!r}, model={self.model!r})"

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_lock")
        state.pop("_opener")
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        proxies = {} if urlsplit(self.url).hostname in _LOOPBACK else None
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler(proxies))

    @property
    def where(self) -> str:
        return self._clean(self.url)

    def identity(self) -> dict[str, Any]:
        return {"name": self.name, "url": self.where, "model": self.model, "question": self.question,
                "thinking_tags": [list(pair) for pair in self.thinking_tags],
                "response_prefix": self.response_prefix}

    def stats(self) -> dict[str, int]:
        with self._lock:
            return dict(self._stats)

    def start(self) -> None:
        return None

    def close(self) -> None:
        return None

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._stats[key] += n

    def _clean(self, text: str) -> str:
        """One line, without the API key (or any other known secret)."""
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        text = redact(str(text))
        if key:
            text = text.replace(key, "***")
        return one_line(text)

    # ---- judging ----------------------------------------------------------------------------------

    def judge(self, items: Sequence[tuple[str, str]]) -> list[Verdict]:
        """All items through at most `concurrency` requests at once; the first failure stops the call."""
        self._count("calls")
        if not items:
            return []
        with ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="openai-judge") as pool:
            futures = [pool.submit(self._verdict, prompt, reply) for prompt, reply in items]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            failed = next((f for f in futures if f in done and f.exception() is not None), None)
            if failed is not None:
                for future in futures:
                    future.cancel()
                self._count("failures")
                error = failed.exception()
                if not isinstance(error, (_Retryable, _Final)):
                    raise error  # a bug, not the endpoint: keep its traceback
                raise UserError(self._clean(str(error))) from None
        verdicts = [f.result() for f in futures]
        self._count("items", len(verdicts))
        self._count("refusals", sum(v.refusal for v in verdicts))
        return verdicts

    def _verdict(self, prompt: str, reply: str) -> Verdict:
        answer = strip_thinking(reply, self.thinking_tags, self.response_prefix)
        body = json.dumps({
            "model": self.model,
            "messages": [{"role": "user", "content": format_question(self.question, prompt, answer)}],
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
        }).encode("utf-8")
        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self.retries + 1),
            wait=tenacity.wait_exponential(multiplier=self.backoff_s, min=self.backoff_s, max=self.max_backoff_s),
            retry=tenacity.retry_if_exception_type(_Retryable),
            before_sleep=lambda _state: self._count("retries"),
            reraise=True,
        )
        content = retrying(self._ask, body)
        return self._parse(content)

    def _parse(self, content: str) -> Verdict:
        text = strip_thinking(content, self.thinking_tags)
        match = _ANSWER.match(text)
        if match is None:
            raise _Final(f"the judge model {self.model} at {self.where} answered {text[:60]!r}, neither yes nor no: "
                         "use a model that follows the question, or reword evaluation.judge.question")
        refusal = match.group(1).lower() == "yes"
        return Verdict(refusal=refusal, score=1.0 if refusal else 0.0)

    def _ask(self, body: bytes) -> str:
        """One request; the content of the first choice. Raises _Retryable or _Final."""
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(self.endpoint, data=body, headers=headers, method="POST")
        self._count("requests")
        try:
            with self._opener.open(request, timeout=self.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as error:
            raise self._http_error(error) from None
        except (TimeoutError, socket.timeout):
            raise _Retryable(self._timeout_message()) from None
        except urllib.error.URLError as error:
            if isinstance(error.reason, (TimeoutError, socket.timeout)):
                raise _Retryable(self._timeout_message()) from None
            raise _Retryable(f"no OpenAI-compatible endpoint answers at URL: {self.where} ({error.reason}; "
                             f"{self.retries + 1} tries): start it or fix evaluation.judge.url") from None
        except (OSError, http.client.HTTPException) as error:
            raise _Retryable(f"no OpenAI-compatible endpoint answers at URL: {self.where} ({error}; "
                             f"{self.retries + 1} tries): start it or fix evaluation.judge.url") from None
        return self._content(raw)

    def _timeout_message(self) -> str:
        return (f"the judge endpoint {self.where} did not answer within {self.timeout_s:g} s "
                f"({self.retries + 1} tries): raise evaluation.judge.timeout_s or check the server")

    def _http_error(self, error: urllib.error.HTTPError) -> Exception:
        try:
            detail = error.read().decode("utf-8", errors="replace")[:200]
        except Exception:  # the body is only a hint
            detail = ""
        status = error.code
        where = f"the judge endpoint {self.endpoint}"
        if status == 401:
            env = self.api_key_env or "an API key variable"
            had_key = bool(self.api_key_env and os.environ.get(self.api_key_env))
            return _Final(f"{where} {'refused the API key' if had_key else 'needs an API key'} (HTTP 401): "
                          f"set the environment variable {env} to a valid key (evaluation.judge.api_key_env names it)")
        if status == 429 or status >= 500:
            return _Retryable(f"{where} answered HTTP {status} ({self.retries + 1} tries): {detail}")
        return _Final(f"{where} answered HTTP {status}: {detail}")

    def _content(self, raw: bytes) -> str:
        try:
            data = json.loads(raw)
            content = data["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as error:
            what = "not JSON" if isinstance(error, ValueError) else f"no choices[0].message.content ({error!r})"
            raise _Retryable(f"the judge endpoint {self.endpoint} answered something that is not a chat completion "
                             f"({what}; {self.retries + 1} tries): is the URL an OpenAI-compatible /v1 API?") from None
        if not isinstance(content, str):
            raise _Retryable(f"the judge endpoint {self.endpoint} answered a chat completion without text content "
                             f"({self.retries + 1} tries)")
        return content
