"""JudgementCache: judged replies kept in the run directory, so a resumed evaluation pays once.

A verdict depends on the judge's identity (name, model, markers, question, threshold...), the prompt
and the reply; its key is the sha256 of the three. The file (`evaluation/judgements.jsonl` by
default) holds one {"key", "refusal", "score"} object a line and no prompt or reply text. Object
stores cannot append, so `flush()` rewrites the whole file through the run directory's atomic
whole-file write (local: temp file + rename; object stores: one PUT).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Sequence
from typing import Any, Protocol

from .judges.base import Judge, Verdict

log = logging.getLogger(__name__)

JUDGEMENTS_FILE = "evaluation/judgements.jsonl"


class FileStore(Protocol):
    """What the cache needs of a run directory (heretic_dist.rundir.RunDir has it)."""

    def exists(self, name: str) -> bool: ...

    def read_bytes(self, name: str) -> bytes: ...

    def write_bytes(self, name: str, data: bytes) -> None: ...


def judgement_key(identity: dict[str, Any], prompt: str, reply: str) -> str:
    """sha256 over the judge identity (canonical JSON), the prompt and the reply, each length-framed."""
    digest = hashlib.sha256()
    for part in (json.dumps(identity, sort_keys=True, ensure_ascii=False), prompt, reply):
        data = part.encode("utf-8")
        digest.update(len(data).to_bytes(8, "big"))
        digest.update(data)
    return digest.hexdigest()


class JudgementCache:
    """Verdicts by key, loaded from `path` in `store` on first use, written back by `flush()`."""

    def __init__(self, store: FileStore, path: str = JUDGEMENTS_FILE) -> None:
        self.store = store
        self.path = path
        self._entries: dict[str, Verdict] | None = None
        self._dirty = False
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"JudgementCache({self.store!r}, {self.path!r})"

    def __len__(self) -> int:
        with self._lock:
            return len(self._load())

    def _load(self) -> dict[str, Verdict]:
        if self._entries is not None:
            return self._entries
        entries: dict[str, Verdict] = {}
        if self.store.exists(self.path):
            text = self.store.read_bytes(self.path).decode("utf-8", errors="replace")
            bad = 0
            for line in text.splitlines():
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    entries[str(row["key"])] = Verdict.from_dict(row)
                except (ValueError, KeyError, TypeError):
                    bad += 1
            if bad:
                log.warning("skipped %d corrupt line(s) of the judgement cache %s (they are judged again)",
                            bad, self.path)
                self._dirty = True  # the next flush writes a clean file
        self._entries = entries
        return entries

    def get(self, identity: dict[str, Any], prompt: str, reply: str) -> Verdict | None:
        with self._lock:
            return self._load().get(judgement_key(identity, prompt, reply))

    def put(self, identity: dict[str, Any], prompt: str, reply: str, verdict: Verdict) -> None:
        with self._lock:
            self._load()[judgement_key(identity, prompt, reply)] = verdict
            self._dirty = True

    def flush(self) -> None:
        """Rewrite the file if anything changed (whole-file atomic write of the run directory)."""
        with self._lock:
            if not self._dirty or self._entries is None:
                return
            lines = [json.dumps({"key": k, **v.to_dict()}) for k, v in self._entries.items()]
            self.store.write_bytes(self.path, ("\n".join(lines) + "\n" if lines else "").encode("utf-8"))
            self._dirty = False


class CachedJudge:
    """A judge that serves cached verdicts and asks the inner judge only for the rest.

    What the inner judge answers is cached and flushed at once (a crash later loses nothing); a call
    that fails caches nothing and propagates its error.
    """

    def __init__(self, inner: Judge, cache: JudgementCache) -> None:
        self.inner = inner
        self.cache = cache
        self.name = inner.name
        self._hits = 0
        self._misses = 0

    def __repr__(self) -> str:
        return f"CachedJudge({self.inner!r})"

    def identity(self) -> dict[str, Any]:
        return self.inner.identity()

    def judge(self, items: Sequence[tuple[str, str]]) -> list[Verdict]:
        identity = self.inner.identity()
        verdicts: list[Verdict | None] = [self.cache.get(identity, p, r) for p, r in items]
        missing = [i for i, v in enumerate(verdicts) if v is None]
        self._hits += len(items) - len(missing)
        self._misses += len(missing)
        if missing:
            fresh = self.inner.judge([items[i] for i in missing])
            if len(fresh) != len(missing):
                raise RuntimeError(f"judge {self.name} returned {len(fresh)} verdicts for {len(missing)} items")
            for i, verdict in zip(missing, fresh):
                verdicts[i] = verdict
                self.cache.put(identity, items[i][0], items[i][1], verdict)
            self.cache.flush()
        return [v for v in verdicts if v is not None]

    def start(self) -> None:
        self.inner.start()

    def flush(self) -> None:
        """Write pending verdicts (judge() already flushes after each call the inner judge answers)."""
        self.cache.flush()

    def stats(self) -> dict[str, int]:
        return {**self.inner.stats(), "cache_hits": self._hits, "cache_misses": self._misses}

    def close(self) -> None:
        self.inner.close()
