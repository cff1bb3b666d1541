"""The cost model of the study: how long a part (an experiment, or one of bench.py's probes) takes,
from timings bench.py measured, scaled to another model, device and amount of work. bench.py writes
the timings (and, beside each, what this model predicted before it ran); study.py estimates each
experiment with it before it starts.

A part's time is fixed + rate x work:
  work   the count its time grows with, in the part's own unit (decoded and scored rows for A,
         pairs x fitted maps for D, ...): each experiment script's work(args, n_pairs, config)
  fixed  what it takes at no work (set-up, summary, figures), and rate, both from one bench row:
         bench times each part twice, at the script's --smoke preset (what the study runs on
         tiny-random) and at its size, and the line through the two points gives them (where the
         time does not rise with the work, fixed costs decided it: their mean, rate 0).
Across models and devices only the rate scales (with the parameters, and with the device's matmul
rate where the row was measured on another device); the fixed part is host time and stays. A row
of an older bench (no work column) is scaled by its pairs alone. Rows are used only from the same
kind of device (CPU or GPU) and a model within 10x of the size: scaling further misleads (a GPU
row of the 3B shape spends most of its time off the matmul units, a tiny row on overheads). Read
the result as a guide, right within a factor of two where the row's device and model are this
run's; the first part of a process also pays the imports, a study's every part the model load.
"""
import functools
from pathlib import Path

import torch

import common
from zcausal import runs

# Qwen/Qwen2.5-3B's config.json, the fields that decide the shape and the cost.
QWEN25_3B = dict(hidden_size=2048, num_hidden_layers=36, num_attention_heads=16,
                 num_key_value_heads=2, intermediate_size=11008, vocab_size=151936,
                 tie_word_embeddings=True, rope_theta=1_000_000.0, max_position_embeddings=32768,
                 rms_norm_eps=1e-6, hidden_act="silu")
SHAPES = ("qwen2.5-3b", "tiny")  # bench.py's model shapes

# The table bench.py appends to, one row per part. The columns after "note" came with the cost
# model; a table without them is read with them empty (and appended to after adding them).
COLUMNS = ["run", "shape", "device", "dtype", "engine", "part", "status", "seconds",
           "decode_seconds", "pairs",
           "batch_size", "decodes", "new_tokens", "model_tokens", "limit_basis", "compute_limit_s",
           "fraction_of_limit", "per_decode_ms", "batched_speedup", "step_ms", "eager_step_ms",
           "generate_step_ms", "speedup_vs_generate", "peak_memory_gb", "matmul_tflops", "note",
           "work", "smoke_seconds", "smoke_work", "estimate_s"]
# The tables of measured rows: the user's own first (this machine), then the committed ones.
COST_TABLES = [Path("results") / "bench" / "bench.csv", runs.REPO / "results" / "bench.csv"]


def shape_config(shape, tokenizer=None):
    """The Qwen2Config of a bench shape (the tiny one sized to the tiny tokenizer)."""
    from transformers import Qwen2Config
    if shape == "tiny":
        return common.tiny_config(len(tokenizer or common.tiny_tokenizer()))
    return Qwen2Config(**QWEN25_3B, eos_token_id=0, pad_token_id=0, bos_token_id=0)


def parameter_count(config):
    """Parameters of a model of `config` (counted on the meta device: no memory, no weights)."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


@functools.lru_cache(maxsize=None)
def shape_parameters(shape):
    """Parameters of a bench shape, counted once per process (a meta build of the 3B shape takes
    seconds, and study.py estimates five parts)."""
    return parameter_count(shape_config(shape))


def device_name(device):
    """The name a bench row records for the device: the GPU's, or CPU (arch, threads)."""
    import platform
    return (torch.cuda.get_device_name(device) if str(device).startswith("cuda")
            else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)")


def matmul_tflops(device, dtype):
    """The device's measured rate for one large matrix product in `dtype` (random data, the median
    of 10 after 3 warm-ups): the ceiling a compute limit is read against, and the scale between
    devices of the cost model."""
    import statistics
    import time
    n = 8192 if torch.device(device).type == "cuda" else 1024
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=gen).to(dtype)
    b = torch.randn(n, n, device=device, generator=gen).to(dtype)
    times = []
    for i in range(13):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        if i >= 3:
            times.append(time.perf_counter() - start)
    return 2 * n ** 3 / statistics.median(times) / 1e12


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def read_table(path):
    """A bench table with every column of COLUMNS (those it lacks empty); None when its columns
    are not an earlier form of COLUMNS (a file of another schema)."""
    frame = runs.load_csv(path)
    if frame.columns.tolist() != COLUMNS[:len(frame.columns)]:
        return None
    return frame.reindex(columns=COLUMNS)


def cost_rows(tables=None):
    """The finished rows (status ok, with pairs) of the bench tables that exist, newest first."""
    import pandas as pd
    frames = [read_table(t) for t in (tables or COST_TABLES) if Path(t).is_file()]
    frames = [f for f in frames if f is not None and len(f)]
    if not frames:
        return pd.DataFrame(columns=COLUMNS)
    rows = pd.concat(frames, ignore_index=True)
    rows = rows[(rows.status == "ok") & rows.pairs.notna() & (rows.seconds > 0)]
    return rows.sort_values("run", ascending=False, kind="stable")


def fixed_and_rate(row):
    """(fixed seconds, seconds per unit of work, low point) of a bench row: the line through its
    smoke run (smoke_work, smoke_seconds) and its run (work, seconds), where the time rises with
    the work; (the mean of the two times, 0, None) where it does not (there the fixed costs, not
    the work, decided the time); (0, seconds / work, None) without a smoke run. `fixed` comes out
    below 0 when the time grows faster than the work: line_seconds floors the line there."""
    seconds, work = float(row["seconds"]), float(row["work"])
    low_s, low_w = row.get("smoke_seconds"), row.get("smoke_work")
    if not (_number(low_s) and _number(low_w)) or low_w == work:
        return 0.0, seconds / work, None
    rate = (seconds - low_s) / (work - low_w)
    if rate <= 0:
        return (seconds + low_s) / 2, 0.0, None
    low = min((low_w, low_s), (work, seconds))
    return low[1] - rate * low[0], rate, low


def line_seconds(row, work, scale=1.0):
    """Seconds for `work` on a bench row's line (fixed_and_rate), its rate times `scale`; never
    below the time proportional to the work through the line's lower point."""
    fixed, rate, low = fixed_and_rate(row)
    seconds = fixed + rate * scale * work
    if fixed < 0:
        seconds = max(seconds, low[1] / low[0] * scale * work)
    return seconds


def _number(value):
    import math
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def estimate(part, rows, work, pairs, parameters, tflops, device):
    """(seconds, basis) for `part` doing `work` (its unit; None: unknown) on `pairs` pairs with a
    model of `parameters` on `device` (matmul rate `tflops`), from the newest matching row of
    `rows` (cost_rows): this very device first, then another of its kind; (None, what to run to
    get one) without one."""
    name = device_name(device)
    cpu = name.startswith("CPU")
    mine = rows[(rows.part == part) & (rows.device.str.startswith("CPU") == cpu)]
    mine = mine[[s in SHAPES and 0.1 <= shape_parameters(s) / parameters <= 10
                 for s in mine["shape"]]]
    if not len(mine):
        return None, (f"no bench row of part {part} for a model of this size on a "
                      f"{'CPU' if cpu else 'GPU'}: python bench.py --parts {part} "
                      f"--shape {nearest_shape(parameters)}{' --device cpu' if cpu else ''} "
                      f"here gives one")
    here = mine[mine.device == name]
    row = (here if len(here) else mine).iloc[0]
    # the rate scales with the model and, across devices, with the matmul rate (on the row's own
    # device the rate measured now says more about the machine's load than about the device)
    scale = parameters / shape_parameters(row["shape"]) * (
        1.0 if row["device"] == name else row["matmul_tflops"] / tflops)
    where = f"bench part {part} on {row['device']} ({row['run']})"
    if work is not None and _number(row["work"]) and row["work"] > 0:
        smoke = (f"{row['smoke_seconds']:.2g} s at {row['smoke_work']:.4g} and "
                 if _number(row.get("smoke_seconds")) else "")
        return line_seconds(row, work, scale), (
            f"{where}: {smoke}{row['seconds']:.2g} s at {row['work']:.4g} units of work; this "
            f"run {work:.4g}" + (f", the rate x {scale:.3g}" if scale != 1 else ""))
    seconds = float(row["seconds"]) * pairs / float(row["pairs"]) * scale
    return seconds, (f"{where}: {row['seconds']:.3g} s for {int(row['pairs'])} pairs of "
                     f"random-{row['shape']}, scaled by pairs")


def nearest_shape(parameters):
    """The bench shape whose size is closest to `parameters` (in ratio)."""
    import math
    return min(SHAPES, key=lambda s: abs(math.log(shape_parameters(s) / parameters)))
