"""Timing of the study, part by part, on a random-weight model of Qwen2.5-3B's exact shape.

    python bench.py                                  # Qwen2.5-3B's shape, bf16, on the GPU: every part
    python bench.py --parts step a                   # the decode step and A's gold grid only
    python bench.py --shape tiny --parts a --limit 4 # a small shape on the CPU, in seconds
    python bench.py --out results/bench.csv          # append to the committed table of timings

Parts (in this order; --parts picks, --limit sizes A, the sample, B, C and D):
  a       Experiment A's gold grid (2 layers x k {20, 50} x positions {prompt, all} x source
          {mean, ot} x every condition and random draw, same and swap sources), batched, at the
          new tokens the direct template needs (--new-tokens to change; random weights never stop,
          so every decode runs that many)
  single  a small grid of A decoded one row at a time and batched: the per-decode ratio
  step    one batch (512 rows x 150-token prompt on the GPU): the per-step decode time of the fast
          and eager engines and of model.generate, from (t(1 + n tokens) - t(1 token)) / n
  b, c, d Experiments B, C (10 layers x 3 lambdas x 2 starts) and D
  e       the layer sweep (SWEEP_FLAGS sizes it)
Every part runs the scripts' own main() (A, B, C, D, the sweep) on the random model, handed to them
in place of loading one (`serving`), writing into a temporary folder: the time a user waits.
Each part prints its row and appends it to --out the moment it ends, with the device name, peak
memory, and its fraction of the compute limit: model tokens x 2 x parameters / the device's matmul
rate, which bench measures first (one large product in the model's dtype). The default --out,
results/bench/bench.csv, is git-ignored (a user's timings never modify a tracked file); the
committed rows are results/bench.csv, appended to only when --out names it.
A part that fails prints its error, writes a row saying so, and the next part runs.
"""
import contextlib
import io
import math
import resource
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import torch

import common
from zcausal import cost, decoding, problems, runs

# Per shape: A's layers, ks, pairs, random draws and batch; the one-at-a-time sample's pairs; the
# step part's batch, prompt length and tokens; C's steps; D's ks.
SHAPES = {
    "qwen2.5-3b": dict(layers=[32, 33], ks=[20, 50], pairs=40, n_random=10, batch_size=512,
                       single_pairs=6, step_batch=512, step_prompt=150, step_tokens=20,
                       c_steps=500, d_ks=[20, 50]),
    "tiny": dict(layers=[2, 3], ks=[4, 8], pairs=6, n_random=2, batch_size=128,
                 single_pairs=4, step_batch=64, step_prompt=32, step_tokens=20, c_steps=20,
                 d_ks=[4, 8]),
}
PARTS = ["a", "single", "step", "b", "c", "d", "e"]
# The layer sweep's sizing flags per shape; flags
# its parser does not know are left out (and named in the row's note).
SWEEP_FLAGS = {"qwen2.5-3b": [], "tiny": [["--n-random", "2"], ["--layer", "2"], ["--das-steps", "4"]]}
COLUMNS = cost.COLUMNS
# The parts that run an experiment's main(): each is also timed at its script's --smoke preset
# (smoke_flags), the second point of the cost model's line (zcausal/cost.py).
EXPERIMENT_PARTS = {"a": "exp_a_patching", "b": "exp_b_residual", "c": "exp_c_ard_mmd",
                    "d": "exp_d_bridge", "e": "exp_e_layer_sweep"}


def build_model(shape, device, dtype):
    """A random-weight Qwen2ForCausalLM of the shape, built directly on the device."""
    from transformers import Qwen2ForCausalLM
    tokenizer = common.tiny_tokenizer()
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(cost.shape_config(shape, tokenizer))
    model.to(dtype).eval()
    model.name_or_path_for_results = f"random-{shape}"
    model.tokenizer_for_decoding = tokenizer  # decoding's digit table (stop_when_number_ends)
    return model, tokenizer


class PartError(Exception):
    """A part that failed after measuring something: its row keeps `fields` beside the error."""

    def __init__(self, err, **fields):
        super().__init__(f"{type(err).__name__}: {err}")
        self.fields = fields


class Timer:
    def __init__(self, device):
        self.device = torch.device(device)

    def elapsed(self):
        self._sync()
        return time.perf_counter() - self.start

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
    """Peak GPU memory allocated since the last reset; on a CPU the process's peak resident set."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def direct_new_tokens(pairs):
    """New tokens the direct template needs: the longest answer's digits (Qwen writes one token
    per digit, right after the prompt) plus the token that ends the number."""
    return max(len(problems.format_number(p["answer"])) for p in pairs) + 1


# ----------------------------------------------------------------------------------------------
# Running the scripts' own main() on the random model

@contextlib.contextmanager
def serving(model, tokenizer, *modules):
    """Hand `model` to scripts in place of loading one: common.load_model / load_model_config (and
    the same names imported into `modules`) return it and its config while inside."""
    def load_model(*args, **kwargs):
        return model, tokenizer

    def load_model_config(*args, **kwargs):
        return model.config

    saved = []
    for module in (common,) + modules:
        for name, fn in (("load_model", load_model), ("load_model_config", load_model_config)):
            if hasattr(module, name):
                saved.append((module, name, getattr(module, name)))
                setattr(module, name, fn)
    try:
        yield
    finally:
        for module, name, fn in reversed(saved):
            setattr(module, name, fn)


def accepted(parse_args, base, optional):
    """base + each optional flag group that parse_args accepts (scripts gain flags over time);
    returns (argv, the groups left out)."""
    argv, left_out = list(base), []
    for group in optional:
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                parse_args(argv + list(group))
            argv += list(group)
        except SystemExit:
            left_out.append(group[0])
    return argv, left_out


def run_script(module, argv, optional, ctx, workdir):
    """module.main(parse_args(argv + accepted optional flags)) on the served model, its --out and
    --figures under workdir; with ctx["smoke"], the script's --smoke preset instead (smoke_flags).
    Returns (seconds, out folder, flags left out, the run's work: module.work)."""
    out = Path(workdir) / module.__name__
    base = ["--model", ctx["model"].name_or_path_for_results, "--device", ctx["device"],
            "--dtype", ctx["dtype_name"], "--out", str(out)]  # figures: <out>/figures
    if ctx.get("smoke"):
        argv, optional = smoke_flags(module.__name__), []
    argv, left_out = accepted(module.parse_args, base + argv, optional)
    args = module.parse_args(argv)
    work = module.work(args, args.limit, ctx["model"].config)
    with serving(ctx["model"], ctx["tokenizer"], module), Timer(ctx["device"]) as t:
        module.main(args)
    return t.seconds, out, left_out, work


def smoke_flags(name):
    """The flags of experiment `name`'s smoke run, what study.py runs on tiny-random (no activation
    cache: bench writes only its table)."""
    return ["--smoke"] + (["--cache-dir", "none"] if name in ("exp_b_residual", "exp_c_ard_mmd",
                                                            "exp_d_bridge") else [])


@contextlib.contextmanager
def timing_decodes(device):
    """Add up the time spent inside decoding.generate_and_score while inside (the scripts call it
    through the module), so a part can tell decoding from its set-up, summary and figures."""
    original, spent = decoding.generate_and_score, {"seconds": 0.0, "calls": 0}

    def timed(*args, **kwargs):
        with Timer(device) as t:
            result = original(*args, **kwargs)
        spent["seconds"] += t.seconds
        spent["calls"] += 1
        return result

    decoding.generate_and_score = timed
    try:
        yield spent
    finally:
        decoding.generate_and_score = original


def _rows_in(path):
    return len(runs.load_csv(path)) if Path(path).is_file() else float("nan")


# ----------------------------------------------------------------------------------------------
# Parts: each returns its row's fields

def _a_grid(ctx, workdir, layers, ks, positions, sources, n_random, pairs, batch_size):
    import exp_a_patching as A
    argv = ["--layer", *map(str, layers), "--k", *map(str, ks), "--positions", *positions,
            "--source", *sources, "--n-random", str(n_random), "--limit", str(pairs),
            "--max-new-tokens", str(ctx["new_tokens"]), "--batch-size", str(batch_size)]
    # random weights answer nothing: every pair of prompts.json (whose answers new_tokens fits) kept
    optional = [["--template", "direct"], ["--decode", ctx["engine"]],
                ["--n-random-logprob", str(n_random)],
                ["--prompts", str(problems.DEFAULT_PROMPTS)], ["--solved", "off"],
                ["--min-pairs", "2"]]
    with timing_decodes(ctx["device"]) as decode, Timer(ctx["device"]) as wall:
        try:
            seconds, out, left_out, work = run_script(A, argv, optional, ctx, workdir)
        except Exception as err:  # noqa: BLE001 - e.g. the summary failed after every decode
            raise PartError(err, seconds=wall.elapsed(), decode_seconds=decode["seconds"],
                            decodes=_rows_in(Path(workdir) / A.__name__ / "generations.csv"),
                            pairs=pairs, batch_size=batch_size, new_tokens=ctx["new_tokens"])
    return seconds, decode["seconds"], _rows_in(out / "generations.csv"), left_out, work


def part_a(ctx, workdir):
    spec = ctx["spec"]
    try:
        seconds, decoding_s, decodes, left_out, work = _a_grid(
            ctx, workdir, spec["layers"], spec["ks"], ["prompt", "all"], ["mean", "ot"],
            spec["n_random"], ctx["pairs"], spec["batch_size"])
    except PartError as err:  # decoded, then failed: the decoding time still compares
        if err.fields.get("decodes", 0) > 0:
            ctx["a_decode_ms"] = 1e3 * err.fields["decode_seconds"] / err.fields["decodes"]
        raise
    ctx["a_decode_ms"] = 1e3 * decoding_s / decodes
    return dict(seconds=seconds, decode_seconds=decoding_s, pairs=ctx["pairs"], work=work,
                batch_size=spec["batch_size"], decodes=decodes,
                new_tokens=ctx["new_tokens"], model_tokens=decodes * ctx["new_tokens"],
                limit_basis="generated tokens", per_decode_ms=1e3 * decoding_s / decodes,
                note=_note(left_out))


def part_single(ctx, workdir):
    """A small grid of A (first layer and k, prompt scope, mean source, 2 random draws) at batch 1
    and batched: the same decodes, so the ratio of the time inside generate_and_score is the gain
    from batching (the runs' shared set-up, summary and figures left out)."""
    spec = ctx["spec"]
    pairs = min(ctx["pairs"], spec["single_pairs"])
    grid = ([spec["layers"][0]], [spec["ks"][0]], ["prompt"], ["mean"], 2, pairs)
    _, batched, decodes, left_out, _ = _a_grid(ctx, Path(workdir) / "batched", *grid,
                                               spec["batch_size"])
    seconds, single, _, _, _ = _a_grid(ctx, Path(workdir) / "single", *grid, 1)
    return dict(seconds=seconds, decode_seconds=single, pairs=pairs, batch_size=1, decodes=decodes,
                new_tokens=ctx["new_tokens"], model_tokens=decodes * ctx["new_tokens"],
                limit_basis="generated tokens", per_decode_ms=1e3 * single / decodes,
                batched_speedup=single / batched,
                note=_note(left_out, f"batched: {batched:.3g} s decoding" + (
                    f"; {1e3 * single / decodes / ctx['a_decode_ms']:.3g}x the A grid's decoding "
                    f"time per decode" if "a_decode_ms" in ctx else "")))


def part_step(ctx, workdir):
    """Per-step decode time on one batch, fast and eager engines and model.generate."""
    spec, model, device = ctx["spec"], ctx["model"], ctx["device"]
    B, T, n = spec["step_batch"], spec["step_prompt"], spec["step_tokens"]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, len(ctx["tokenizer"]), (B, T), generator=gen).to(device)
    mask = torch.ones_like(ids)

    def ours(engine):
        return lambda new: decoding.generate_and_score(model, ids, mask, new, engine=engine)

    def hf(new):
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                              min_new_tokens=new, do_sample=False, pad_token_id=0)

    fast, eager, reference = (per_step_seconds(fn, n, device) for fn in (ours("fast"), ours("eager"), hf))
    return dict(batch_size=B, new_tokens=n, model_tokens=B * n,
                limit_basis="generated tokens", step_ms=1e3 * fast, eager_step_ms=1e3 * eager,
                generate_step_ms=1e3 * reference, speedup_vs_generate=reference / fast,
                compute_limit_s=B * 2 * ctx["parameters"] / (ctx["tflops"] * 1e12),
                fraction_of_limit=B * 2 * ctx["parameters"] / (ctx["tflops"] * 1e12) / fast,
                note=f"{T}-token prompts; limit and fraction per step; fast engine "
                     f"{'with' if device.startswith('cuda') else 'without'} CUDA graphs"
                     + ("; a per-step time came out <= 0: the machine's load swamped the "
                        "difference, rerun it idle" if min(fast, eager, reference) <= 0 else ""))


def per_step_seconds(decode, n, device, repeats=2):
    """(t(1 + n new tokens) - t(1 new token)) / n: the prefill cancels. One warm-up first (CUDA
    graph capture, library autotuning), then the median of `repeats` of each, interleaved."""
    decode(n + 1)
    short, long = [], []
    for _ in range(repeats):
        for new, times in ((1, short), (n + 1, long)):
            with Timer(device) as t:
                decode(new)
            times.append(t.seconds)
    return (statistics.median(long) - statistics.median(short)) / n


def _texts_tokens(ctx):
    """Tokens of the bare questions (zh and en) of the benchmark's pairs: what B, C and D forward."""
    tok = ctx["tokenizer"]
    return sum(len(tok(p[lang], add_special_tokens=False)["input_ids"])
               for p in ctx["pair_data"] for lang in ("en", "zh"))


def part_b(ctx, workdir):
    import exp_b_residual as B
    layer, k = _scaled(ctx, 32), ctx["spec"]["d_ks"][-1]
    seconds, _, left_out, work = run_script(B, ["--layer", str(layer), "--k", str(k),
                                                "--limit", str(ctx["pairs"]), "--cache-dir",
                                                "none"], [], ctx, workdir)
    return _forward_row(ctx, seconds, left_out, work)


def part_c(ctx, workdir):
    import exp_c_ard_mmd as C
    steps = str(ctx["spec"]["c_steps"])
    seconds, _, left_out, work = run_script(C, ["--steps", steps, "--min-steps", steps, "--limit",
                                                str(ctx["pairs"]), "--cache-dir", "none"], [],
                                            ctx, workdir)
    return _forward_row(ctx, seconds, left_out, work, "10 layers x 3 lambdas x 2 starts, "
                        f"{steps} steps each; the limit counts the forward")


def part_d(ctx, workdir):
    import exp_d_bridge as D
    argv = ["--layer", str(_scaled(ctx, 32)), "--k", *map(str, ctx["spec"]["d_ks"]), "--limit",
            str(ctx["pairs"]), "--cache-dir", "none"]
    seconds, _, left_out, work = run_script(D, argv, [], ctx, workdir)
    return _forward_row(ctx, seconds, left_out, work)


def part_e(ctx, workdir):
    """The layer sweep: its main() with --limit and SWEEP_FLAGS for the shape."""
    import exp_e_layer_sweep as E
    pairs = max(ctx["pairs"], 8)  # DAS's train / validation / test split needs 2 problems each
    # random weights answer nothing: time every pair (--solved off), as the study's kept pairs
    seconds, _, left_out, work = run_script(E, [], [["--limit", str(pairs)], ["--solved", "off"],
                                                    ["--min-pairs", str(pairs)]] +
                                            SWEEP_FLAGS[ctx["shape"]], ctx, workdir)
    return dict(seconds=seconds, pairs=pairs, work=work, note=_note(left_out))


def _scaled(ctx, plan_layer):
    n = common.num_layers(ctx["model"])
    return min(n - 1, int(math.floor(plan_layer / 36 * n + 0.5)))


def _forward_row(ctx, seconds, left_out, work, note=""):
    tokens = _texts_tokens(ctx)
    return dict(seconds=seconds, pairs=ctx["pairs"], work=work, model_tokens=tokens,
                limit_basis="prompt tokens forwarded once", note=_note(left_out, note))


def _note(left_out, text=""):
    flags = f"flags its parser lacks: {' '.join(left_out)}" if left_out else ""
    return "; ".join(x for x in (text, flags) if x)


# ----------------------------------------------------------------------------------------------

def record(row, out):
    """Print the row and append it to the CSV at once (flushed), so a run cut short keeps it."""
    frame = pd.DataFrame([{c: row.get(c) for c in COLUMNS}])
    runs.write_csv(frame, out, append=out.exists())
    shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in row.items()
             if v is not None and k in COLUMNS[5:] and not (isinstance(v, float) and math.isnan(v))}
    print(f"[bench] {row['part']}: " + ", ".join(f"{k}={v}" for k, v in shown.items()), flush=True)


def timed_part(name, ctx):
    """The part's fields (its time as `seconds`); an error becomes a row saying so."""
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as workdir, \
            Timer(ctx["device"]) as wall:
        try:
            fields = globals()[f"part_{name}"](ctx, workdir)
        except PartError as err:
            fields = dict(status="error", note=str(err)[:300], **err.fields)
        except Exception as err:  # noqa: BLE001 - a failed part must not stop the benchmark
            fields = dict(status="error", note=f"{type(err).__name__}: {err}"[:300])
    return {"seconds": wall.seconds, **fields}


def smoke_run(name, ctx):
    """An experiment part at its script's --smoke preset: {smoke_seconds, smoke_work}, or {} when
    it failed (the cost model then puts all of the part's time on its work). Run first, so that it,
    like a study's first part, pays the imports the part needs."""
    ctx["smoke"] = True
    try:
        fields = timed_part(name, ctx)
    finally:
        ctx["smoke"] = False
    if fields.get("status", "ok") != "ok" or fields.get("work") is None:
        return {}
    return dict(smoke_seconds=fields["seconds"], smoke_work=fields["work"])


def run_part(name, ctx, out):
    """One part: timed (an experiment part at its --smoke preset first, smoke_run), its limit,
    memory and the cost model's estimate from the earlier rows added, its row recorded."""
    device = ctx["device"]
    smoke = smoke_run(name, ctx) if name in EXPERIMENT_PARTS else {}
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    row = {"run": ctx["run"], "shape": ctx["shape"], "device": ctx["device_name"],
           "dtype": ctx["dtype_name"], "engine": ctx["engine_used"], "part": name, "status": "ok",
           **timed_part(name, ctx), **smoke, "peak_memory_gb": peak_memory_gb(device),
           "matmul_tflops": ctx["tflops"]}
    if row.get("seconds") and row.get("model_tokens") and row.get("compute_limit_s") is None:
        row["compute_limit_s"] = row["model_tokens"] * 2 * ctx["parameters"] / (ctx["tflops"] * 1e12)
        row["fraction_of_limit"] = row["compute_limit_s"] / row["seconds"]
    if row.get("pairs") is not None:  # what the cost model said from the rows before this run
        row["estimate_s"] = cost.estimate(name, ctx["cost_rows"], row.get("work"), row["pairs"],
                                          ctx["parameters"], ctx["tflops"], device)[0]
    record(row, out)
    return row


def setup(args):
    """The model, the pairs and the device's numbers every part reads (printed as they come)."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    common.check_runtime(device, args.dtype)
    dtype = common.resolve_dtype(args.dtype, device)
    spec = SHAPES[args.shape]
    pairs = spec["pairs"] if args.limit is None else args.limit
    data = problems.load_prompts(problems.DEFAULT_PROMPTS)
    if not 2 <= pairs <= len(data["pairs"]):
        raise runs.UsageError(f"--limit {pairs}: pass 2 to {len(data['pairs'])} (prompts.json)")
    with Timer(device) as build:
        model, tokenizer = build_model(args.shape, device, dtype)
    ctx = dict(run=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), shape=args.shape,
               spec=spec, device=device, device_name=cost.device_name(device),
               dtype_name=str(dtype).replace("torch.", ""), model=model, tokenizer=tokenizer,
               pairs=pairs, pair_data=data["pairs"][:pairs], engine=args.decode,
               engine_used=decoding.resolve_engine(args.decode, model),
               parameters=sum(p.numel() for p in model.parameters()),
               new_tokens=(direct_new_tokens(data["pairs"][:pairs]) if args.new_tokens is None
                           else args.new_tokens))
    ctx["tflops"] = cost.matmul_tflops(device, dtype)
    ctx["cost_rows"] = cost.cost_rows([args.out] + cost.COST_TABLES)
    print(f"[bench] {ctx['device_name']}, {ctx['dtype_name']}, shape {args.shape}: "
          f"{ctx['parameters'] / 1e9:.3f} B parameters built in {build.seconds:.1f} s; "
          f"matmul {ctx['tflops']:.3g} TFLOP/s; decode engine {ctx['engine_used']}; "
          f"{pairs} pairs; A decodes {ctx['new_tokens']} new tokens "
          f"({'set by --new-tokens' if args.new_tokens else 'what the direct template needs'})",
          flush=True)
    return ctx


def upgrade_table(out, rows):
    """A table of an earlier bench (the first columns of COLUMNS) rewritten with every column,
    its rows kept as they were written (counts stay integers beside empty cells) and the new
    columns empty, so that this run's rows can be appended."""
    had = runs.load_csv(out).columns.tolist()
    if had != COLUMNS:
        for name in had:
            values = rows[name].dropna()
            if rows[name].dtype.kind == "f" and len(values) \
                    and values.apply(float.is_integer).all():
                rows[name] = rows[name].astype("Int64")
        runs.write_csv(rows, out)
        print(f"[bench] {out}: added the columns {', '.join(COLUMNS[len(had):])}", flush=True)


def main(args):
    runs.check_counts(args)
    out = runs.check_file_arg("--out", args.out)
    earlier = cost.read_table(out) if out.exists() else None
    if out.exists() and earlier is None:
        raise runs.UsageError(f"{out} holds rows of another schema; pass another --out (or move "
                              f"that file away)")
    ctx = setup(args)
    if earlier is not None:
        upgrade_table(out, earlier)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = [run_part(name, ctx, out) for name in PARTS if name in args.parts]
    print(f"[bench] appended {len(rows)} rows to {out}", flush=True)
    return rows


def parse_args(argv=None):
    parser = runs.make_parser(__doc__)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-3b",
                        help="model shape: Qwen2.5-3B's (random weights) or a tiny one for a CPU")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=PARTS,
                        help="which parts to time, run in the order listed above")
    parser.add_argument("--limit", "--pairs", dest="limit", type=int, default=None,
                        help="use the first N pairs of prompts.json, for A, B, C, D and the sweep "
                             "(default: 40 for the 3B shape, 6 tiny)")
    parser.add_argument("--new-tokens", type=int, default=None,
                        help="new tokens per A decode (default: what the direct template needs)")
    decoding.add_decode_args(parser, aliases=("--engine",))  # passed to A as its --decode
    parser.add_argument("--device", default=None, help="cpu or cuda; None: cuda if available")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="None: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--out", type=Path, default=Path("results") / "bench" / "bench.csv",
                        help="CSV the rows are appended to, one per part as it ends (the "
                             "committed rows: results/bench.csv)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    runs.run_cli(main, parse_args())
