"""Refusal judges of `evaluate-front`, chosen by name: keywords, classifier (a Ray actor), openai.

    judge = make_judge(settings.evaluation.judge, settings.refusal_markers, response_prefix,
                       cache=JudgementCache(run_dir))
    verdicts = judge.judge([(prompt, reply), ...])

The judge modules themselves are imported by `make_judge` only when chosen (the classifier needs Ray
and torch, the endpoint judge threads and HTTP). The cache is in heretic_dist/evaluation/cache.py.
"""

from .base import Judge, JudgeFactory, Verdict, judge_names, make_judge, register_judge, strip_thinking

__all__ = ["Judge", "JudgeFactory", "Verdict", "judge_names", "make_judge", "register_judge", "strip_thinking"]
