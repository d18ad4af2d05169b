"""The GPU check's measuring steps; scripts/gpu_check.py runs each one in its own process.

    python scripts/gpu_check_steps.py STEP --args JSON --result FILE

STEP: device (GPU facts, copy bandwidth, bf16 matmul rate), build (a random-weight HF folder of a model
shape), trials (the real Engine in process: seconds per trial, forwards counted), worker (trials behind
a start barrier, for two workers on one GPU; `stub` leaves torch out), dry (the CPU self-check).
torch and the engine are imported inside the functions, so the stub worker starts in milliseconds.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPES: dict[str, dict[str, Any]] = {
    # the benchmark model's architecture (Qwen2.5-0.5B; its embeddings are tied)
    "qwen2.5-0.5b": {"arch": "qwen2", "params": 494_032_768, "config": dict(
        hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
        intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True)},
    # an 8B-class model (Llama-3.1-8B's shapes)
    "llama-3.1-8b": {"arch": "llama", "params": 8_030_261_248, "config": dict(
        hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False)},
    # the dry run's CPU model (64 wide: bitsandbytes' CPU layout needs rows divisible by 32)
    "tiny": {"arch": "llama", "params": None, "config": dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=1024, tie_word_embeddings=False)},
}


def model_config(shape: str, **extra):
    from transformers import AutoConfig

    spec = SHAPES[shape]
    return AutoConfig.for_model(spec["arch"], max_position_embeddings=4096, **spec["config"], **extra)


def meta_parameters(shape: str) -> int:
    """Parameter count of a shape, built on the meta device (no memory, no values)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config(shape))
    return sum(p.numel() for p in model.parameters())


def load_tokenizer(folder: str | None):
    """A small chat tokenizer: the given folder (e.g. SmolLM2's, collected with the wheels), else the
    tests' tiny BPE tokenizer. A vocabulary smaller than the model's embedding is fine for speed."""
    if folder and Path(folder, "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer, folder
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_models import tiny_tokenizer

    return tiny_tokenizer(), "tiny BPE (tests/tiny_models.py)"


def build(args: dict) -> dict:
    """Save a random-weight bf16 model of args["shape"] with the tokenizer as an HF folder."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    start = time.perf_counter()
    tokenizer, tokenizer_source = load_tokenizer(args.get("tokenizer"))
    config = model_config(args["shape"], eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    config.vocab_size = max(config.vocab_size, len(tokenizer))  # only the tiny shape's is smaller
    torch.manual_seed(0)
    with torch.device(args.get("device", "cuda")):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    folder = Path(args["folder"])
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    params = sum(p.numel() for p in model.parameters())
    disk = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    return {"folder": str(folder), "params": params, "disk_bytes": disk, "tokenizer": tokenizer_source,
            "tokenizer_vocab": len(tokenizer), "seconds": time.perf_counter() - start}


def device(args: dict) -> dict:
    """GPU facts, device-to-device copy bandwidth (read + write bytes) and a bf16 matmul rate."""
    import torch
    import transformers

    def timed(fn, reps: int) -> float:
        for _ in range(3):
            fn()
        times = []
        for _ in range(reps):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(begin.elapsed_time(end) / 1e3)
        return sorted(times)[len(times) // 2]  # the median

    props = torch.cuda.get_device_properties(0)
    size = int(args.get("copy_bytes", 2 * 2**30))
    a = torch.empty(size, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    copy_s = timed(lambda: b.copy_(a), 10)
    del a, b
    n = 8192
    x = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    y = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    mm_s = timed(lambda: x @ y, 10)
    return {"name": props.name, "count": torch.cuda.device_count(), "memory_bytes": props.total_memory,
            "capability": f"{props.major}.{props.minor}", "torch": torch.__version__,
            "cuda": torch.version.cuda, "transformers": transformers.__version__,
            "copy_bytes": 2 * size, "copy_s": copy_s, "bandwidth_Bps": 2 * size / copy_s,
            "bf16_flops": 2 * n**3 / mm_s}


def prompt_paths(prompts_dir: str | None) -> tuple[Path, Path, str]:
    """Harmless and harmful prompt files: the given folder, the shared test sets, else the demo sets."""
    candidates = []
    if prompts_dir:
        candidates += [(Path(prompts_dir) / f"{s}.txt", Path(prompts_dir) / f"{t}.txt")
                       for s, t in (("harmless", "harmful"), ("harmless_test", "harmful_test"))]
    shared = REPO.parent / "shared" / "data" / "prompts"
    candidates.append((shared / "harmless_test.txt", shared / "harmful_test.txt"))
    for good, bad in candidates:
        if good.is_file() and bad.is_file():
            return good, bad, str(good.parent)
    data = REPO / "heretic_dist" / "data"
    return data / "demo_harmless.txt", data / "demo_harmful.txt", "built-in demo sets (cycled)"


def eval_prompts(prompts_dir: str | None, n_good: int, n_bad: int, system: str):
    from heretic_dist.config import PromptSetSpec
    from heretic_dist.prompts import load_prompt_set

    good_path, bad_path, source = prompt_paths(prompts_dir)

    def take(path: Path, n: int) -> list:
        prompts = load_prompt_set(PromptSetSpec(dataset=str(path)), system)
        return [prompts[i % len(prompts)] for i in range(n)]

    return take(good_path, n_good), take(bad_path, n_bad), source


def random_params(rng: random.Random, n_layers: int) -> dict:
    """A point of the search space (its ranges, scripts/bench_memory.py's sampler)."""
    last = n_layers - 1
    raw = {"direction_scope": rng.choice(["global", "per layer"]),
           "direction_index": rng.uniform(0.4 * last, 0.9 * last)}
    for c in ("attn.o_proj", "mlp.down_proj"):
        raw |= {f"{c}.max_weight": rng.uniform(0.8, 1.5), f"{c}.max_weight_position": rng.uniform(0.6 * last, last),
                f"{c}.min_weight": rng.uniform(0, 1), f"{c}.min_weight_distance": rng.uniform(1, 0.6 * last)}
    return raw


class ForwardCounter:
    """Counts the decoder's forwards: decode steps (one new token per row) and prompt forwards
    (prefill and KL), with the rows and the attention width of each."""

    def __init__(self, model):
        decoder = getattr(model, "model", None) or model.get_decoder()
        self.handle = decoder.register_forward_pre_hook(self._hook, with_kwargs=True)
        self.reset()

    def reset(self) -> None:
        self.decode_calls = self.decode_rows = self.decode_row_context = 0
        self.prompt_calls = self.prompt_tokens = 0

    def _hook(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs["inputs_embeds"]
        rows, width = ids.shape[0], ids.shape[1]
        mask = kwargs.get("attention_mask")
        context = mask.shape[-1] if hasattr(mask, "shape") else width
        if width == 1:
            self.decode_calls += 1
            self.decode_rows += rows
            self.decode_row_context += rows * context
        else:
            self.prompt_calls += 1
            self.prompt_tokens += rows * width

    def counts(self) -> dict:
        return {k: getattr(self, k) for k in ("decode_calls", "decode_rows", "decode_row_context",
                                              "prompt_calls", "prompt_tokens")}


def model_bytes(model, tensor_parallel: int = 1) -> dict:
    """Bytes a forward reads (every parameter once, the input embedding left out when it is not the
    output head: a lookup reads only its rows), bytes per cached token, matmul parameters."""
    import torch

    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is embed
    read = 0
    for p in model.parameters():
        if p is embed and not tied:
            continue
        read += p.numel() * p.element_size()
        state = getattr(p, "quant_state", None)  # bitsandbytes 4-bit: its scales are read too
        for t in (getattr(state, "absmax", None), getattr(getattr(state, "state2", None), "absmax", None)):
            read += t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0
    c = model.config.get_text_config()
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_per_token = c.num_hidden_layers * 2 * (c.num_key_value_heads // tensor_parallel) * head_dim * 2  # bf16
    q, kv = c.num_attention_heads * head_dim, c.num_key_value_heads * head_dim  # a dense decoder layer:
    matmul = c.num_hidden_layers * (2 * c.hidden_size * (q + kv) + 3 * c.hidden_size * c.intermediate_size)
    return {"read_bytes_per_forward": read, "kv_bytes_per_token": kv_per_token,
            "matmul_params": matmul // tensor_parallel,  # q, k, v, o and the 3 MLP matrices, no head
            "parameters": sum(p.numel() for p in model.parameters()), "tied_embeddings": tied}


def make_settings(args: dict):
    from heretic_dist.config import Settings

    extra = {"cluster": {"tensor_parallel": args["tensor_parallel"]}} if args.get("tensor_parallel", 1) > 1 else {}
    # draft_tokens = 0 by default: the decode limit counts one new token per row per decode step
    return Settings(model=args["folder"], dtypes=[args.get("dtype", "bfloat16")],
                    quantization=args.get("quantization", "none"), max_response_length=args["tokens"],
                    batch_size=args.get("batch_size", 0), seed=0, response_prefix="",
                    prepack_weights=False, draft_tokens=args.get("draft_tokens", 0), **extra)


def force_full_length(engine) -> None:
    """Worst case: no marker early stop, and an end-of-sequence id that argmax never returns."""
    engine.early_stop = False
    model = engine.loaded.model
    model.generation_config.eos_token_id = [model.config.get_text_config().vocab_size]


def trials(args: dict) -> dict:
    """The real Engine in process: load, baselines, one warm-up trial, then args["trials"] timed trials."""
    import torch

    from heretic_dist.engine.engine import Engine
    from heretic_dist.engine.types import Shard
    from heretic_dist.search.space import decode_trial_params

    cuda = torch.cuda.is_available()
    if cuda and args.get("memory_fraction"):
        torch.cuda.set_per_process_memory_fraction(float(args["memory_fraction"]))
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t0 = time.perf_counter()
    engine = Engine(make_settings(args))
    force_full_length(engine)
    load_s = time.perf_counter() - t0
    n_layers = len(engine.components.layers)
    hidden = engine.model.config.get_text_config().hidden_size
    generator = torch.Generator().manual_seed(0)
    engine.set_directions(torch.nn.functional.normalize(torch.randn(n_layers + 1, hidden, generator=generator), dim=1))
    good, bad, source = eval_prompts(args.get("prompts"), args["n_good"], args["n_bad"], engine.settings.system_prompt)
    engine.set_eval_prompts(good, bad)
    t1 = time.perf_counter()
    engine.warm_baselines([Shard()])
    baseline_s = time.perf_counter() - t1
    rng = random.Random(0)
    points = [decode_trial_params(random_params(rng, n_layers), n_layers) for _ in range(args["trials"] + 1)]
    engine.run_trial(points[0], Shard())  # warm-up (kernels, allocator)
    counter = ForwardCounter(engine.loaded.model)
    if args.get("barrier"):
        wait_barrier(args["barrier"], args["worker"], args["workers"])
    rows, began = [], time.time()
    for params in points[1:]:
        counter.reset()
        sync()
        start = time.perf_counter()
        part = engine.run_trial(params, Shard())
        sync()
        rows.append({"seconds": time.perf_counter() - start, **part.timings, **counter.counts()})
    ended = time.time()
    counter.handle.remove()
    return {"load_s": load_s, "baseline_s": baseline_s, "trials": rows, "wall_start": began, "wall_end": ended,
            "n_good": len(good), "n_bad": len(bad), "tokens": args["tokens"], "prompts": source,
            "expected_decode_rows": len(bad) * (args["tokens"] - 1),
            "peak_memory_bytes": torch.cuda.max_memory_allocated() if cuda else None,
            "device": str(engine.model.device), "batch": dict(engine._batch),
            **model_bytes(engine.loaded.model, args.get("tensor_parallel", 1))}


def wait_barrier(folder: str, worker: int, workers: int, timeout_s: float = 300) -> None:
    """Each worker writes its ready file, then waits for all of them (so timed sections overlap)."""
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    (path / f"ready-{worker}").write_text(str(time.time()))
    deadline = time.time() + timeout_s
    while len(list(path.glob("ready-*"))) < workers:
        if time.time() > deadline:
            raise TimeoutError(f"barrier: {workers} workers never ready")
        time.sleep(0.05)


def worker(args: dict) -> dict:
    """One of several plain processes sharing a GPU; `stub` (the dry run) sleeps instead of a trial."""
    if not args.get("stub"):
        return trials(args)
    wait_barrier(args["barrier"], args["worker"], args["workers"])
    began = time.time()
    rows = []
    for _ in range(args["trials"]):
        start = time.perf_counter()
        time.sleep(args.get("stub_s", 0.05))
        rows.append({"seconds": time.perf_counter() - start})
    return {"trials": rows, "wall_start": began, "wall_end": time.time()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["device", "build", "trials", "worker", "dry"])
    parser.add_argument("--args", default="{}", help="the step's arguments as JSON")
    parser.add_argument("--result", required=True, help="file for the step's JSON result")
    ns = parser.parse_args()
    args = json.loads(ns.args)
    if ns.step == "dry":
        from gpu_check_dry import dry

        result = dry(args)
    else:
        result = {"device": device, "build": build, "trials": trials, "worker": worker}[ns.step](args)
    import os

    if int(os.environ.get("RANK", "0")) == 0:  # under DeepSpeed's launcher only rank 0 reports
        Path(ns.result).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
