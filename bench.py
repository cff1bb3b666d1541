"""Timing of the whole study on a random-weight model of Qwen2.5-3B's exact shape.

    python bench.py                  # Qwen2.5-3B's shape (about 6 GB of bf16 weights) on the GPU
    python bench.py --shape tiny     # a small shape on the CPU, under a minute

Times, in one run and on one model: Experiment A's gold grid (2 layers x k {20, 50} x positions
{prompt, all} x source {mean, ot} x every condition, random draws and swap rows) batched, the same
rows one at a time on a sample (the ratio is per decode), generated tokens per second, peak memory,
B's extraction of every layer, C's 10 layers x 3 lambdas, and D's bridge. Prints a table and writes
results/bench.csv (with the device name). Random weights never emit a stop token, so every decode
runs the full --max-new-tokens: an upper bound for a real model, which stops after its answer.
"""
import argparse
import platform
import resource
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import torch

import common
import decoding
import problems
import runs
import exp_a_patching as A

# Qwen/Qwen2.5-3B's config.json, the fields that decide the shape and the cost.
QWEN25_3B = dict(hidden_size=2048, num_hidden_layers=36, num_attention_heads=16,
                 num_key_value_heads=2, intermediate_size=11008, vocab_size=151936,
                 tie_word_embeddings=True, rope_theta=1_000_000.0, max_position_embeddings=32768,
                 rms_norm_eps=1e-6, hidden_act="silu")

# Per shape: A's layers and ks, pairs, random draws, tokens, the single-row sample; C's steps.
SHAPES = {
    "qwen2.5-3b": dict(layers=[32, 33], ks=[20, 50], pairs=40, n_random=10, max_new_tokens=100,
                       single_sample=64, batch_size=512, c_steps=500),
    "tiny": dict(layers=[2, 3], ks=[4, 8], pairs=6, n_random=2, max_new_tokens=8,
                 single_sample=16, batch_size=128, c_steps=20),
}


def build_model(shape, device, dtype):
    """A random-weight Qwen2ForCausalLM of the shape, built directly on the device."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    tokenizer = common.tiny_tokenizer()
    if shape == "tiny":
        config = common.tiny_config(len(tokenizer))
    else:
        config = Qwen2Config(**QWEN25_3B, eos_token_id=0, pad_token_id=0, bos_token_id=0)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(config)
    model.to(dtype).eval()
    model.name_or_path_for_results = f"random-{shape}"
    return model, tokenizer


class Timer:
    def __init__(self, device):
        self.device = torch.device(device)

    def __enter__(self):
        self._sync()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self._sync()
        self.seconds = time.perf_counter() - self.start

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def peak_memory_gb(device):
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def bench_a(model, tokenizer, pairs, templates, spec, device):
    """A's gold grid batched, then a sample of the same decodes one at a time."""
    args = SimpleNamespace(k=spec["ks"], positions=["prompt", "all"], source=["mean", "ot"],
                           fold_norm=False, n_random=spec["n_random"], n_random_logprob=0, seed=0,
                           batch_size=spec["batch_size"], max_new_tokens=spec["max_new_tokens"],
                           template="cot", site="output", skip_first=False, random_kind="uniform")
    swap_of = A.derangement([p["answer"] for p in pairs], 0)
    generations, scores, earlier = A.Store(None, pairs), A.Store(None, pairs), set()
    with Timer(device) as batched:
        for layer in spec["layers"]:
            earlier |= A.run_layer(model, tokenizer, pairs, templates, layer, args, swap_of,
                                   generations, scores, earlier)[3]
    n_batched = len(generations.results)
    sample = sorted(generations.results)[::max(1, n_batched // spec["single_sample"])][
        :spec["single_sample"]]
    by_layer = {}
    for job in sample:  # none jobs carry layer -1: run them in the first layer's hook
        by_layer.setdefault(job[1] if job[1] >= 0 else spec["layers"][0], []).append(job)
    setup_seconds, single_seconds = 0.0, 0.0
    for layer, jobs in by_layer.items():
        setup, decode = _one_at_a_time(model, tokenizer, pairs, templates, layer, args, swap_of,
                                       jobs, device)
        setup_seconds += setup * len(spec["layers"]) / len(by_layer)
        single_seconds += decode
    per_single = single_seconds / len(sample)
    # The same grid one row at a time: the same per-layer set-up (sources, bases, OT), then every
    # decode alone at the measured per-decode cost.
    single_grid = setup_seconds + n_batched * per_single
    return {"a_grid_decodes": n_batched, "a_grid_seconds": batched.seconds,
            "a_single_sample": len(sample), "a_single_seconds_per_decode": per_single,
            "a_single_grid_seconds_estimated": single_grid,
            "a_single_measure_seconds": setup_seconds + single_seconds,
            "a_batched_speedup": single_grid / batched.seconds,
            "a_generated_tokens_per_second": n_batched * spec["max_new_tokens"] / batched.seconds}


def _one_at_a_time(model, tokenizer, pairs, templates, layer, args, swap_of, jobs, device):
    """(set-up seconds, decode seconds) for `jobs` the naive way: each row alone, its whole prompt
    through every layer, with the same patch and scores."""
    setup = Timer(device).__enter__()
    ctx = A.prepare_layer(model, tokenizer, pairs, templates, layer, args, swap_of)
    en_texts, _ = A.prompt_texts(pairs, templates, "en")
    stop_ids = problems.stop_token_ids(tokenizer)
    setup.__exit__()
    with Timer(device) as t:
        for job in jobs:
            ids, mask, _ = common.tokenize_left_padded(tokenizer, [en_texts[job[0]]], device=device)
            rows = decoding.select_prefill(ctx.prefill, [job.problem])
            patch = A.make_patch([job], ctx, rows, args).to(device)
            reference = [problems.answer_continuation(tokenizer, pairs[job[0]]["answer"], "en")]
            partner = [problems.answer_continuation(tokenizer, pairs[swap_of[job[0]]]["answer"], "en")]
            out = decoding.generate_and_score(model, ids, mask, args.max_new_tokens, patch, stop_ids,
                                            score=[reference, partner])
            problems.decode_response(tokenizer, out["tokens"][0], stop_ids)
    return setup.seconds, t.seconds


def bench_b(model, tokenizer, pairs, device):
    texts = [p[lang] for p in pairs for lang in ("en", "zh")]
    layers = list(range(-1, common.num_layers(model)))
    with Timer(device) as t:
        common.extract_activations(model, tokenizer, texts, layers, pool="mean", cache_dir=None,
                                   batch_size=32)
    return {"b_extract_seconds": t.seconds, "b_texts": len(texts), "b_layers": len(layers)}


def bench_c(model, tokenizer, pairs, spec, device):
    """C's default grid: 10 layers (the plan's depth fractions) x 3 lambdas x 2 starts."""
    import exp_c_ard_mmd as C
    args = C.parse_args(["--model", "unused", "--steps", str(spec["c_steps"]),
                         "--min-steps", str(spec["c_steps"]), "--cache-dir", "none"])
    layers, basis_layer = C.resolve_layers(args, model.config)
    splits = C.split_problems(len(pairs), args.val_frac, args.test_frac, 0)
    z_energy = C.compute_z_energy(model, basis_layer, min(args.k, common.hidden_size(model)))
    with Timer(device) as extract:
        zh, en, _ = C.load_clouds(model, tokenizer, pairs, layers, args)
    with Timer(device) as fit:
        C.compute_all(zh, en, layers, splits, z_energy, args, device)
    return {"c_extract_seconds": extract.seconds, "c_fit_seconds": fit.seconds,
            "c_fits": len(layers) * len(args.lambdas) * len(args.start), "c_steps": spec["c_steps"]}


def bench_d(model, tokenizer, pairs, device):
    """D at the basis layer for k = 20 and 50 (scaled to the shape), 100 shuffles."""
    import exp_d_bridge as D
    layer = common.plan_layer_at_depth(model)
    texts = [p["zh"] for p in pairs] + [p["en"] for p in pairs]
    with Timer(device) as t:
        pooled = common.extract_activations(model, tokenizer, texts, [layer], cache_dir=None)[:, 0]
        for k in (20, 50):
            k = max(2, round(k * common.hidden_size(model) / 2048))
            basis = common.z_basis(model, layer, k).numpy()
            y, x = D.z_coordinates(pooled[:len(pairs)], basis), D.z_coordinates(pooled[len(pairs):], basis)
            D.compute_bridge(x, y, n_shuffles=100, n_folds=10, seed=0)
    return {"d_seconds": t.seconds}


def run(args):
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = common.resolve_dtype(args.dtype, device)
    spec = SHAPES[args.shape]
    data = problems.load_prompts(problems.DEFAULT_PROMPTS)
    pairs = data["pairs"][:spec["pairs"]]
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with Timer(device) as load:
        model, tokenizer = build_model(args.shape, device, dtype)
    device_name = (torch.cuda.get_device_name(device) if torch.device(device).type == "cuda"
                   else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)")
    result = {"shape": args.shape, "device": device_name, "dtype": str(dtype).replace("torch.", ""),
              "pairs": len(pairs), "build_seconds": load.seconds}
    with Timer(device) as total:
        result.update(bench_a(model, tokenizer, pairs, data["templates"]["cot"], spec, device))
        result.update(bench_b(model, tokenizer, pairs, device))
        result.update(bench_c(model, tokenizer, pairs, spec, device))
        result.update(bench_d(model, tokenizer, pairs, device))
    # the one-at-a-time measurement is not part of the study
    result["study_seconds"] = total.seconds - result.pop("a_single_measure_seconds")
    result["peak_memory_gb"] = peak_memory_gb(device)
    return result


def main(args):
    result = run(args)
    width = max(len(k) for k in result)
    for key, value in result.items():
        print(f"{key:<{width}}  {value:.3f}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    runs.write_csv(pd.DataFrame([result]), out, append=out.exists())
    print(f"appended to {out}")
    return result


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-3b")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    parser.add_argument("--out", type=Path, default=runs.REPO / "results" / "bench.csv",
                        help="CSV the measurements are appended to (one row per run)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    runs.run_cli(main, parse_args())
