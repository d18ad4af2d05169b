"""What `refusal_judge` costs inside the search: seconds per trial with the refusal markers (replies stop
at the first marker) against a judge (replies run to full length, then judged by the worker).

SmolLM2-135M (configs/demo.toml: 20 + 20 scoring prompts, 24-token replies), one in-process ModelWorker
(no Ray), the same fixed trial parameters for every variant, each trial run --repeats times (median):
- markers: the search's built-in count (upstream's way, early stop);
- keywords judge: the same markers read over the full replies (the cost of losing the early stop);
- openai judge on a stub endpoint on 127.0.0.1 that answers "no" at once (the cost of the HTTP round
  trips, 4 in flight; a real judge model adds its own generation time on top).

Usage: python scripts/bench_refusal_judge.py [--repeats 3] [--record]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _benchdoc import REPO, load_text, machine, now_utc, wait_for_quiet, write_section  # noqa: E402

from heretic_dist.config import load_settings  # noqa: E402
from heretic_dist.distributed.driver import load_prompts  # noqa: E402
from heretic_dist.distributed.worker import ModelWorker  # noqa: E402
from heretic_dist.engine.ablation import directions_from_sums  # noqa: E402
from heretic_dist.engine.types import Shard  # noqa: E402
from heretic_dist.search.space import decode_trial_params  # noqa: E402


class StubJudge(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 - the http.server API
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = json.dumps({"choices": [{"message": {"role": "assistant", "content": "no"}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def trial_params(n_layers: int, weight: float):
    raw = {"direction_scope": "global", "direction_index": 0.6 * (n_layers - 1)}
    for c in ("attn.o_proj", "mlp.down_proj"):
        raw |= {f"{c}.max_weight": weight, f"{c}.max_weight_position": 0.6 * (n_layers - 1),
                f"{c}.min_weight": 0.2, f"{c}.min_weight_distance": 0.5 * (n_layers - 1)}
    return decode_trial_params(raw, n_layers)


def worker_for(settings, prompts, directions) -> ModelWorker:
    worker = ModelWorker("hf", settings)
    worker.set_response_prefix("")
    worker.set_directions(directions)
    worker.set_eval_prompts(prompts["good_evaluation_prompts"], prompts["bad_evaluation_prompts"])
    worker.warm_baselines([Shard()])
    return worker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-load", type=float, default=0.5)
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", 0), StubJudge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    base = load_settings(REPO / "configs" / "demo.toml", {"response_prefix": ""})
    prompts = load_prompts(base)
    probe = ModelWorker("hf", base)
    (good, n_good), (bad, n_bad) = probe.residual_sums(prompts["good_prompts"]), probe.residual_sums(prompts["bad_prompts"])
    directions = directions_from_sums(good, n_good, bad, n_bad, True)
    n_layers = probe.info()["n_layers"]
    del probe
    variants = {
        "markers (early stop)": base,
        "keywords judge (full replies)": base.model_copy(update={"refusal_judge": {"name": "keywords"}}),
        "openai judge, stub endpoint": base.model_copy(update={"refusal_judge": {
            "name": "openai", "url": url, "model": "stub", "api_key_env": None}}),
    }
    variants = {k: load_settings(None, v.model_dump(mode="json")) for k, v in variants.items()}
    wait_for_quiet(args.max_load, 300)
    load = load_text()
    rows = []
    for name, settings in variants.items():
        worker = worker_for(settings, prompts, directions)
        for weight in (0.6, 1.2):
            params = trial_params(n_layers, weight)
            times, result = [], None
            for _ in range(args.repeats):
                t = time.perf_counter()
                result = worker.run_trial(params, Shard())
                times.append(time.perf_counter() - t)
            rows.append((name, weight, statistics.median(times), result.refusals, result.timings.get("judge_s", 0.0)))
            print(rows[-1], flush=True)
    server.shutdown()
    plain = {w: s for n, w, s, _, _ in rows if n.startswith("markers")}
    table = "\n".join(f"| {n} | {w} | {s:.2f} | {s / plain[w]:.2f}x | {j:.2f} | {r}/20 |" for n, w, s, r, j in rows)
    body = f"""## `refusal_judge` in the search: its cost per trial (`scripts/bench_refusal_judge.py`)

- what: SmolLM2-135M (configs/demo.toml: 20 + 20 scoring prompts, 24-token replies, float32 CPU), one
  in-process ModelWorker, fixed parameters (global direction, max_weight 0.6 and 1.2), median of
  {args.repeats} trials each; "openai judge, stub endpoint" is a local HTTP server that answers "no" at once
  (HTTP round trips only; a real judge model adds its own time)
- machine: {machine()}; {load}
- command: `python scripts/bench_refusal_judge.py --repeats {args.repeats} --record`, {now_utc()}
- reading: the early stop only saves the tokens after a marker in replies that contain one; with
  {sum(r for n, _, _, r, _ in rows if n.startswith("markers"))} refusing replies over the marker rows here, it saves
  {"nothing on this model (SmolLM2 refuses none of these prompts), so the judge variants cost only their judging" if not any(r for n, _, _, r, _ in rows if n.startswith("markers")) else "the difference shown"}.
  On a model that refuses, a judge costs up to (max_response_length - marker position) more decode
  steps per refusing reply, plus the judge's own time

| variant | max_weight | s per trial | vs markers | of which judging s | refusals |
|---|---:|---:|---:|---:|---:|
{table}
"""
    print(body)
    if args.record:
        write_section("bench_refusal_judge", body)


if __name__ == "__main__":
    main()
