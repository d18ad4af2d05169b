"""The classifier judge: a local Hugging Face model, loaded once in its own Ray actor.

The model lives in an actor (its own CPUs/GPUs from `[evaluation.judge]`) so the driver never loads
torch weights; the judge object on the driver holds the handle and sends batches of `batch_size`.

Two kinds:
- "sequence-classification": the answer part of the reply alone is classified (refusal classifiers
  are trained on replies, not on request+reply pairs); score = the summed softmax probability of the
  labels in `refusal_labels` (names of config.id2label, exact, else case-insensitive).
- "causal-lm": the model is asked `question` (through its chat template when it has one, thinking
  switched off); score = P(yes) / (P(yes) + P(no)) over the next-token distribution, where P(yes) sums
  the probabilities of the first tokens of "yes", " yes", "Yes", " Yes" (and P(no) likewise). Summing
  the variants makes the score independent of whether the model would start with a space or a
  capital; a first token shared by a yes and a no variant (e.g. a lone space) counts for neither.
refusal = score >= threshold.
"""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from heretic_dist.errors import UserError, redact

from .base import Verdict, check_question, format_question, one_line, strip_thinking

if TYPE_CHECKING:
    from heretic_dist.config.evaluation import JudgeSettings

YES_VARIANTS = ("yes", " yes", "Yes", " Yes")
NO_VARIANTS = ("no", " no", "No", " No")
LOAD_TIMEOUT_S = 1800.0  # a big judge model downloads and loads within this, or the cluster has no room
MAX_CLASSIFIER_TOKENS = 512  # sequence classifiers without a stated limit are truncated here


@dataclass(frozen=True)
class ClassifierSpec:
    """What the actor needs to load and run the model (small and picklable)."""

    model: str
    kind: str
    refusal_labels: tuple[str, ...]
    question: str


# ---- pure helpers (tokenizer / config only; tested without Ray) ----------------------------------


def refusal_label_ids(id2label: dict[Any, str], refusal_labels: Sequence[str], model: str) -> list[int]:
    """Class indices of the refusal labels; one clear error naming the model's labels if one is absent."""
    names = {int(i): str(name) for i, name in id2label.items()}
    ids = []
    for label in refusal_labels:
        exact = [i for i, name in names.items() if name == label]
        loose = [i for i, name in names.items() if name.lower() == label.lower()]
        if not (exact or loose):
            known = ", ".join(repr(names[i]) for i in sorted(names))
            raise UserError(
                f"classifier judge model {model} has no label {label!r} (its labels: {known}); "
                "set evaluation.judge.refusal_labels to the labels that mean refusal"
            )
        ids.extend(exact or loose)
    return sorted(set(ids))


def answer_token_ids(tokenizer: Any, model: str = "") -> tuple[list[int], list[int]]:
    """First-token ids of the yes variants and of the no variants (ids shared by both dropped)."""

    def first_ids(words: Sequence[str]) -> set[int]:
        ids = set()
        for word in words:
            encoded = tokenizer.encode(word, add_special_tokens=False)
            if encoded:
                ids.add(int(encoded[0]))
        return ids

    yes, no = first_ids(YES_VARIANTS), first_ids(NO_VARIANTS)
    shared = yes & no
    yes, no = yes - shared, no - shared
    if not yes or not no:
        raise UserError(f"the tokenizer of classifier judge model {model} has no first token that tells 'yes' "
                        "from 'no'; use a causal-lm judge model with an ordinary text tokenizer")
    return sorted(yes), sorted(no)


def causal_prompt(tokenizer: Any, question: str, prompt: str, reply: str) -> tuple[str, bool]:
    """(text, has_special_tokens): the filled question through the chat template when there is one."""
    text = format_question(question, prompt, reply)
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": text}]
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                 enable_thinking=False)
        return rendered, True
    return f"{text}\nAnswer:", False


def model_files_digest(model: str) -> str | None:
    """Names and sizes of a local model folder's weight files (a retrained model at the same path
    gets new verdicts); None for hub ids."""
    path = Path(model).expanduser()
    if not path.is_dir():
        return None
    digest = hashlib.sha256()
    for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")) + sorted(path.glob("config.json")):
        digest.update(f"{f.name}:{f.stat().st_size}".encode())
    return digest.hexdigest()[:16]


# ---- the actor ------------------------------------------------------------------------------------


class ClassifierWorker:
    """Runs inside the Ray actor: loads the model once (`load`), then scores batches (`scores`)."""

    def __init__(self, spec: ClassifierSpec) -> None:
        self.spec = spec
        self.model: Any = None
        self.tokenizer: Any = None
        self.label_ids: list[int] = []
        self.yes_ids: list[int] = []
        self.no_ids: list[int] = []

    def load(self) -> dict[str, Any]:
        """Load tokenizer and model; UserError (one line, naming the model) if that fails."""
        import torch
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
        from transformers.utils import logging as hf_logging

        spec = self.spec
        causal = spec.kind == "causal-lm"
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
        model_class = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
        if spec.model.startswith((".", "/", "~")) and not Path(spec.model).expanduser().exists():
            raise UserError(f"classifier judge model {spec.model} not found: no such folder on "
                            f"{socket.gethostname()} (give a model folder or a Hugging Face id)")
        hf_logging.disable_progress_bar()  # the actor's output reaches the driver's terminal
        hf_logging.set_verbosity_error()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(spec.model)
            model, info = model_class.from_pretrained(spec.model, dtype=dtype, output_loading_info=True)
        except (OSError, ValueError, KeyError, ImportError) as error:
            raise UserError(f"cannot load classifier judge model {spec.model}: {one_line(redact(str(error)))}") from None
        missing = [k for k in info.get("missing_keys", []) if not causal]
        if missing:
            raise UserError(
                f"classifier judge model {spec.model} has no trained sequence-classification head (missing: "
                f"{', '.join(sorted(missing)[:3])}); use a classifier model, or kind = \"causal-lm\""
            )
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if model.config.pad_token_id is None:
            model.config.pad_token_id = self.tokenizer.pad_token_id
        if causal:
            self.tokenizer.padding_side = "left"
            self.yes_ids, self.no_ids = answer_token_ids(self.tokenizer, spec.model)
        else:
            self.label_ids = refusal_label_ids(model.config.id2label, spec.refusal_labels, spec.model)
        self.model = model.to(device).eval()
        labels = {int(i): str(n) for i, n in model.config.id2label.items()} if not causal else {}
        return {"device": device, "labels": labels, "yes_ids": self.yes_ids, "no_ids": self.no_ids}

    def scores(self, items: list[tuple[str, str]]) -> list[float]:
        """Refusal scores in [0, 1] of (prompt, answer) pairs, one forward pass."""
        import torch

        with torch.inference_mode():
            if self.spec.kind == "causal-lm":
                return self._causal_scores(items)
            return self._label_scores([answer for _, answer in items])

    def _label_scores(self, answers: list[str]) -> list[float]:
        import torch

        limit = min(int(self.tokenizer.model_max_length or MAX_CLASSIFIER_TOKENS),
                    int(getattr(self.model.config, "max_position_embeddings", None) or MAX_CLASSIFIER_TOKENS))
        batch = self.tokenizer(answers, padding=True, truncation=True, max_length=limit, return_tensors="pt")
        batch = {k: v.to(self.model.device) for k, v in batch.items()}
        probs = torch.softmax(self.model(**batch).logits.float(), dim=-1)
        return probs[:, self.label_ids].sum(dim=-1).clamp(0.0, 1.0).tolist()

    def _causal_scores(self, items: list[tuple[str, str]]) -> list[float]:
        import torch

        rendered = [causal_prompt(self.tokenizer, self.spec.question, p, a) for p, a in items]
        batch = self.tokenizer([text for text, _ in rendered], padding=True, return_tensors="pt",
                               add_special_tokens=not rendered[0][1])
        batch = {k: v.to(self.model.device) for k, v in batch.items()}
        mask = batch["attention_mask"]
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: positions as if unpadded
        logits = self.model(**batch, position_ids=position_ids).logits[:, -1, :].double()
        logprobs = torch.log_softmax(logits, dim=-1)
        yes = torch.logsumexp(logprobs[:, self.yes_ids], dim=-1)
        no = torch.logsumexp(logprobs[:, self.no_ids], dim=-1)
        return torch.sigmoid(yes - no).tolist()  # = P(yes) / (P(yes) + P(no)), stable


# ---- the judge on the driver ----------------------------------------------------------------------


class ClassifierJudge:
    """Driver side: owns the actor, strips thinking, sends batches, turns scores into verdicts."""

    name = "classifier"

    def __init__(self, settings: JudgeSettings, refusal_markers: list[str] | None = None,
                 response_prefix: str = "") -> None:
        if not settings.model:
            raise UserError("the classifier judge needs evaluation.judge.model (a Hugging Face model id or folder)")
        if settings.kind == "causal-lm":
            check_question(settings.question)
        self.spec = ClassifierSpec(settings.model, settings.kind, tuple(settings.refusal_labels), settings.question)
        self.threshold = settings.threshold
        self.batch_size = settings.batch_size
        self.thinking_tags = [tuple(pair) for pair in settings.thinking_tags]
        self.response_prefix = response_prefix
        self.num_cpus, self.num_gpus = settings.num_cpus, settings.num_gpus
        self._stats = {"calls": 0, "items": 0, "batches": 0, "failures": 0, "refusals": 0}
        self._actor: Any = None
        self._closed = False
        self.info: dict[str, Any] = {}  # from the actor once started: device, labels, yes/no token ids

    def __repr__(self) -> str:
        return f"ClassifierJudge({self.spec.model!r}, {self.spec.kind})"

    def start(self) -> None:
        """Start the actor and load the model, if not yet done (judge() does it on first use).

        Call it once Ray is up to fail early (a wrong label, a missing model) rather than after the
        first candidate's replies; constructing the judge touches neither Ray nor the model.
        """
        if self._closed:
            raise UserError("the classifier judge is closed")
        if self._actor is not None:
            return
        import ray

        if ray.is_initialized():
            total = ray.cluster_resources()
            for key, need in (("CPU", self.num_cpus), ("GPU", self.num_gpus)):
                if need > total.get(key, 0.0) + 1e-9:
                    raise UserError(f"the classifier judge needs {need:g} {key} but the Ray cluster has "
                                    f"{total.get(key, 0.0):g}; lower evaluation.judge.num_{key.lower()}s")
        actor_class = ray.remote(ClassifierWorker).options(num_cpus=self.num_cpus, num_gpus=self.num_gpus)
        self._actor = actor_class.remote(self.spec)
        try:
            self.info = self._get([self._actor.load.remote()], LOAD_TIMEOUT_S)[0]
        except BaseException:
            self._kill()
            raise

    def _get(self, refs: list[Any], timeout_s: float | None = None) -> list[Any]:
        """ray.get, with the actor's errors as one UserError line."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        model = self.spec.model
        try:
            return ray.get(refs, timeout=timeout_s)
        except GetTimeoutError:
            raise UserError(f"the classifier judge ({model}) did not load within {timeout_s:.0f} s: "
                            "does the cluster have room for its actor?") from None
        except RayTaskError as error:
            cause = getattr(error, "cause", None)
            if isinstance(cause, UserError):
                raise UserError(one_line(str(cause))) from None
            text = f"{type(cause).__name__}: {cause}" if cause is not None else str(error).strip().splitlines()[-1]
            raise UserError(f"the classifier judge ({model}) failed: {one_line(redact(text))}") from None
        except RayActorError as error:
            first = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
            raise UserError(f"the classifier judge actor ({model}) died: {one_line(redact(first))}") from None

    def identity(self) -> dict[str, Any]:
        spec = self.spec
        identity: dict[str, Any] = {"name": self.name, "model": spec.model, "model_files": model_files_digest(spec.model),
                                    "kind": spec.kind, "threshold": self.threshold,
                                    "thinking_tags": [list(pair) for pair in self.thinking_tags],
                                    "response_prefix": self.response_prefix}
        if spec.kind == "causal-lm":
            identity["question"] = spec.question
        else:
            identity["refusal_labels"] = list(spec.refusal_labels)
        return identity

    def judge(self, items: Sequence[tuple[str, str]]) -> list[Verdict]:
        self.start()
        answers = [(p, strip_thinking(r, self.thinking_tags, self.response_prefix)) for p, r in items]
        batches = [answers[i: i + self.batch_size] for i in range(0, len(answers), self.batch_size)]
        self._stats["calls"] += 1
        try:
            parts = self._get([self._actor.scores.remote(batch) for batch in batches])
        except UserError:
            self._stats["failures"] += 1
            raise
        scores = [min(1.0, max(0.0, float(s))) for part in parts for s in part]
        verdicts = [Verdict(refusal=s >= self.threshold, score=s) for s in scores]
        self._stats["items"] += len(verdicts)
        self._stats["batches"] += len(batches)
        self._stats["refusals"] += sum(v.refusal for v in verdicts)
        return verdicts

    def stats(self) -> dict[str, int]:
        return dict(self._stats)

    def close(self) -> None:
        """Kill the actor (also fine after ray.shutdown(), which has ended it already)."""
        self._closed = True
        self._kill()

    def _kill(self) -> None:
        actor, self._actor = self._actor, None
        if actor is None:
            return
        import ray

        if ray.is_initialized():
            try:
                ray.kill(actor)
            except Exception:  # already gone with its node or the cluster
                pass
