"""Experiment C: ARD-MMD search for Z, the coordinates that the zh and en versions of a problem share.

    python exp_c_ard_mmd.py --model Qwen/Qwen2.5-3B --depth 0.889 --objective contrastive plan
    python exp_c_ard_mmd.py --model tiny-random --smoke        # smoke run, seconds

Data. For each pair i, the token states of the bare zh and en questions (no template) at each
layer of --layers (default: layers 10 15 20 25 28 30 32 33 34 35 of 36 at the same fractions
of this model's depth): two clouds zh_i (n_i, d) and en_i (m_i, d). Left out: the first
token (attention sink) unless --keep-first-token, any token prefix the two questions share (under
causal attention its states are identical in both languages), and with --drop-numbers the tokens of
numbers (the two versions share their digits). Coordinates are standardised per layer with the
median and IQR/1.349 of the pooled tokens of both languages of the training problems (a few
coordinates are orders of magnitude larger than the rest); `--standardise meansd`: mean and sd.

Kernel and objectives (ard_mmd.py). ARD-RBF kernel with lengthscales l_j, w_j = 1/l_j^2;
D_ii' = MMD^2_u(zh_i, en_i') over N training problems.
  plan (the objective as first proposed): sum_i D_ii + lambda * sum_j 1/l_j. Every l_j -> infinity
    sends the kernel to 1 and both terms to 0, so "Z is empty" is its minimum at every lambda.
    Kept to show that.
  contrastive (default):
    L(l) = sum_i [D_ii/tau + log sum_i' exp(-D_ii'/tau)] + sum_i [D_ii/tau + log sum_i' exp(-D_i'i/tau)]
           + 2N * lambda * mean_j (l_ref / l_j)^2      (= (2N/d) lambda l_ref^2 sum_j w_j)
    Each bracket is a cross-entropy: zh_i must find en_i among all problems, and back. A constant
    kernel (all l_j -> infinity, or any l_j -> 0) gives every D = 0 and L = 2 N log N, chance, so
    the empty Z is not a minimum whenever some coordinate separates problems: near that limit
    switching on coordinate j alone changes L by
        w_j [(2N/d) lambda l_ref^2 - (2/tau)(sum_{i,i'} a_j(i,i')/N - sum_i a_j(i,i))]
    (a_j the unbiased squared mean difference in coordinate j). A coordinate that differs by
    language only shifts every D_ii' alike, which the softmax ignores, and pays the penalty. The
    penalty is in the data term's units: 2N * lambda at the isotropic start, so lambda is the
    retrieval cross-entropy (nats per query) that switching every coordinate on must buy;
    --lambdas spans "no effect" (0) to "collapse" (|Z| = 0).

Z. |Z| = #{j : l_j < l_ref}, l_ref the cold start's lengthscale (median pairwise distance of the
layer's standardised training tokens): a coordinate is in Z when the fit weighs it more than the
isotropic kernel does. `z_size_rel` also counts w_j >= 0.1 max_j w_j.

Starts. warm: log l_j = -log(diag(P_Z)_j + eps), diag(P_Z) = (V_Z**2).sum(0) of the
rank-k SVD mask at --layer, shifted so that the k coordinates with the largest diag(P_Z) start
inside Z (l_j < l_ref) and the rest outside (the formula alone has no scale; on standardised data
it puts nearly every coordinate far below l_ref); cold: every l_j = l_ref. --k takes one or several
values: each k is its own mask, with its own warm start (one set of fits per k) and its own overlap
rows; the cold start does not depend on k and is fitted once.

Selection. Problems are split into train / val / test (seeded). Fits see training problems only.
Per (layer, objective, start) the selected lambda is the one with the lowest validation
cross-entropy of the contrastive retrieval (softmax of -D/tau over the validation problems, both
directions; chance log N_val); ties go to the larger lambda. Test retrieval accuracy (argmin_i'
D_ii', both directions, chance 1/N_test) and test cross-entropy are reported for every fit.

Work and resume. All (start, lambda) fits of one (layer, objective) run as one batch (Adam is
elementwise, so batching is exact) and are written to fits/ under --out as soon as they finish;
--resume skips the finished ones and the final files are built from fits/, so a resumed run ends
with the same summary.csv, traces.csv and lengthscales.npz as an uninterrupted one.

Overlap with the SVD mask. ARD's Z (a = |Z| coordinates) against the b = |Z| coordinates with the
largest diag(P_Z) of the rank-k mask out of d, read against a random selection of a coordinates:
its overlap is hypergeometric (expected a b / d; overlap.csv gives the 95% range and the one-sided
p of an overlap at least as large, enrichment, and at most as small, depletion). A warm fit is
compared with the mask it started from; a cold fit with every k's mask. The primary test is the
contrastive cold start at the basis layer against the mask of k = 50 where it ran, else of the
largest k (zcausal/summaries/exp_c.py); the others are Holm-corrected.

Outputs (--out): summary.csv (one row per fit and mask: layer, objective, start, k, lambda; a cold
fit has one row per k, identical but for the overlap columns), overlap.csv (one row per selected
fit and mask: the overlap against chance), traces.csv (loss and |Z| every --log-every steps, one
set per fit; k blank for the cold start), lengthscales.npz (log10 l per (layer, objective, start,
k, lambda), the cold fit repeated along k; diag(P_Z) per k; log10 l_ref), fits/, config.json;
figures z_size, spectrum, overlap and traces (.png) under --figures, the --out path mirrored.
--replot rebuilds overlap.csv and the figures from these files and prints what it wrote.
"""
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from zcausal import ard_mmd, layer_choice, prereg, problems, runs
from zcausal.summaries import exp_c as summary
import common
from zcausal.runs import UsageError

# Defaults, in one place.
PLAN_LAYERS = [10, 15, 20, 25, 28, 30, 32, 33, 34, 35]  # numbered of 36
K = 50
LAMBDAS = [0.0, 0.01, 0.1, 0.3, 1.0, 3.0, 10.0]  # no effect (0, 0.01) ... collapse (10)
LR = 0.01
STEPS = 1000           # at most; the plateau check may stop a fit earlier
MIN_STEPS = 500        # no plateau stop before this many steps
PLATEAU_TOL = 1e-3     # relative change of the loss over ard_mmd.PLATEAU_EVERY steps
LOG_EVERY = 10
WARM_EPS = 1e-3
REL_THRESHOLD = 0.1    # for z_size_rel
VAL_FRAC = 0.25
TEST_FRAC = 0.25
TRACE_COLUMNS = ["loss", "data", "penalty", "z_size"]
# --smoke: flags left at their default take these values (a run of seconds on --model tiny-random)
SMOKE = dict(limit=12, layer_depths=[0.5, 0.75], steps=20, min_steps=0, lr=0.05,
             lambdas=[0.0, 0.01, 10.0], log_every=5)


def parse_args(argv=None):
    p = runs.make_parser(__doc__)
    common.add_common_args(p, "exp_c")
    problems.add_pairs_args(p)
    p.add_argument("--layers", type=int, nargs="+", default=None,
                   help="layers to fit (default: layers 10 15 20 25 28 30 32 33 34 35 of 36 at "
                        "the same fractions of this model's depth)")
    p.add_argument("--layer-depths", type=float, nargs="+", default=None,
                   help="instead of --layers: fractions of depth, each giving the layer "
                        "round(F x number of layers)")
    layer_choice.add_layer_args(p, " as the SVD mask (the warm start and the overlap)")
    p.add_argument("--k", type=int, nargs="+", default=[K],
                   help="rank(s) of the SVD Z mask: each k has its own warm start and overlap "
                        "rows; the cold start is fitted once")
    p.add_argument("--objective", nargs="+", choices=["contrastive", "plan"],
                   default=["contrastive"], help="objectives to fit (see above)")
    p.add_argument("--start", nargs="+", choices=["warm", "cold"], default=["warm", "cold"],
                   help="warm: lengthscales from the SVD mask (see above); cold: all l_ref")
    p.add_argument("--lambdas", type=float, nargs="+", default=LAMBDAS,
                   help="sparsity weights: contrastive 2N * lambda * mean_j (l_ref/l_j)^2; "
                        "plan lambda * sum_j 1/l_j")
    p.add_argument("--steps", type=int, default=STEPS, help="Adam steps per fit, at most")
    p.add_argument("--min-steps", type=int, default=MIN_STEPS,
                   help="no plateau stop before this many steps")
    p.add_argument("--lr", type=float, default=LR, help="Adam learning rate on log l")
    p.add_argument("--tau", type=float, default=ard_mmd.TAU,
                   help="softmax temperature of the contrastive objective")
    p.add_argument("--plateau-tol", type=float, default=PLATEAU_TOL,
                   help=f"stop a fit when its loss moved less than this (relative) over "
                        f"{ard_mmd.PLATEAU_EVERY} steps")
    p.add_argument("--log-every", type=int, default=LOG_EVERY,
                   help="steps between rows of traces.csv")
    p.add_argument("--warm-eps", type=float, default=WARM_EPS,
                   help="eps of the warm start -log(diag(P_Z) + eps)")
    p.add_argument("--standardise", choices=["robust", "meansd"], default="robust",
                   help="per-coordinate scaling: median and IQR, or mean and sd")
    p.add_argument("--val-frac", type=float, default=VAL_FRAC,
                   help="share of problems held out to select lambda")
    p.add_argument("--test-frac", type=float, default=TEST_FRAC,
                   help="share of problems held out to report retrieval")
    runs.add_smoke_arg(p, SMOKE)
    common.add_activation_args(p)
    return runs.apply_smoke(p, p.parse_args(argv), SMOKE, unless={"layer_depths": "layers"})


# ----------------------------------------------------------------------------------------------
# Validation (before any weights load or any file is written)

def resolve_layers(args, config):
    """(sorted fitted layers, basis layer) from --layers / --layer-depths and --layer /
    --depth; errors name the flag."""
    if args.layers is not None and args.layer_depths is not None:
        raise UsageError("pass --layers or --layer-depths, not both")
    if args.layers is not None:
        layers = [common.check_layer(config, layer, flag="--layers",
                                     alternative="fractions of depth with --layer-depths")
                  for layer in args.layers]
    elif args.layer_depths is not None:
        layers = [common.depth_to_layer(config, f, flag="--layer-depths")
                  for f in args.layer_depths]
    else:
        layers = [common.plan_layer_at_depth(config, layer) for layer in PLAN_LAYERS]
    basis = layer_choice.resolve_layer(config, args.layer, args.depth)
    return sorted(set(layers)), basis


def validate(args):
    """Every check that needs no weights. Returns (model config, layers, basis layer)."""
    common.check_runtime(args.device, args.dtype, args.device_map)
    config = common.load_model_config(args.model)
    layers, basis_layer = resolve_layers(args, config)
    for k in args.k:
        common.check_k(config, k, allow_full=False,
                       why="k = d puts every coordinate in the SVD mask: diag(P_Z) is 1 everywhere")
    if len(set(args.k)) < len(args.k):
        raise UsageError(f"--k {' '.join(map(str, args.k))}: each k once")
    if args.lr <= 0 or args.tau <= 0 or args.warm_eps <= 0:
        raise UsageError("--lr, --tau and --warm-eps must be positive")
    if any(lam < 0 for lam in args.lambdas) or len(set(args.lambdas)) < len(args.lambdas):
        raise UsageError("--lambdas must be distinct and non-negative")
    if not (0 < args.val_frac < 1 and 0 < args.test_frac < 1 and args.val_frac + args.test_frac < 1):
        raise UsageError("--val-frac and --test-frac must be in (0, 1) and sum to less than 1")
    return config, layers, basis_layer


def split_problems(n, val_frac, test_frac, seed):
    """Disjoint index arrays train / val / test over n problems (seeded permutation)."""
    n_test, n_val = max(2, round(test_frac * n)), max(2, round(val_frac * n))
    if n - n_test - n_val < 2:
        raise UsageError(f"{n} pairs are too few for train/val/test splits of at least 2 problems "
                         f"each; use more pairs or smaller --val-frac/--test-frac")
    perm = np.random.default_rng(seed).permutation(n)
    return {"test": np.sort(perm[:n_test]), "val": np.sort(perm[n_test:n_test + n_val]),
            "train": np.sort(perm[n_test + n_val:])}


# ----------------------------------------------------------------------------------------------
# Token clouds

def shared_prefix_len(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def load_clouds(model, tokenizer, pairs, layers, args):
    """Token states of the bare questions: two lists (zh, en) of float32 (T_i, len(layers), d) on
    the CPU, without the first token, any zh/en shared token prefix and, with --drop-numbers, the
    tokens of numbers. Also returns how many pairs had a shared prefix beyond the first token."""
    texts = [p["zh"] for p in pairs] + [p["en"] for p in pairs]
    prefix = [shared_prefix_len(*[tokenizer(p[lang], add_special_tokens=False)["input_ids"]
                                  for lang in ("zh", "en")]) for p in pairs]
    drop_first = not args.keep_first_token
    states = common.extract_activations(
        model, tokenizer, texts, layers, pool=None, drop_first=drop_first,
        drop_numbers=args.drop_numbers, skip_prefix=prefix + prefix, batch_size=args.batch_size,
        cache_dir=args.cache_dir, desc="extract zh+en")
    n = len(pairs)
    zh, en = [s.float() for s in states[:n]], [s.float() for s in states[n:]]
    for pair, a, b in zip(pairs, zh, en):
        if min(len(a), len(b)) < 2:
            raise UsageError(f"pair {pair['id']} has fewer than 2 tokens left in one language; "
                             f"the unbiased MMD needs at least 2")
    return zh, en, int(sum(p > int(drop_first) for p in prefix))


def prepare_layer(zh, en, li, splits, method, device):
    """Standardise layer li with training-token statistics; returns {split: (zh, en) Clouds},
    l_ref (cold lengthscale) and the standardisation's range."""
    zh_l, en_l = [c[:, li] for c in zh], [c[:, li] for c in en]
    train = splits["train"]
    centre, scale = ard_mmd.compute_standardisation(
        [zh_l[i] for i in train] + [en_l[i] for i in train], method)

    def standardised(clouds, idx):
        return ard_mmd.make_clouds(*ard_mmd.pad_clouds([(clouds[i] - centre) / scale for i in idx]),
                                   device=device)

    data = {name: (standardised(zh_l, idx), standardised(en_l, idx))
            for name, idx in splits.items()}
    l_ref = ard_mmd.median_pairwise_distance([(zh_l[i] - centre) / scale for i in train]
                                             + [(en_l[i] - centre) / scale for i in train])
    return data, l_ref, {"l_ref": l_ref, "scale_min": float(scale.min()),
                         "scale_max": float(scale.max())}


# ----------------------------------------------------------------------------------------------
# Fits

def compute_z_energy(model, layer, ks, fold_norm=False):
    """diag(P_Z) = (V_Z**2).sum(0) of the rank-k SVD mask at `layer`, per k of `ks`: {k: float32
    (d,), summing to k}. Each k is its own SVD (the per-head stage keeps k vectors per head too), so
    the masks of two k are not nested."""
    return {k: (common.z_basis(model, layer, k, fold_norm=fold_norm) ** 2).sum(0) for k in ks}


def fit_list(args):
    """The fits of one (layer, objective) batch, [(start, k, lambda)] in the order of --start: the
    cold start once (k None: it never sees the mask), the warm start once per k."""
    return [(start, k, lam) for start in args.start
            for k in ([None] if start == "cold" else args.k) for lam in args.lambdas]


def initial_log_l(start, z_energy, l_ref, eps, k):
    """Starting log lengthscales (d,). cold: every l_j = l_ref. warm: the
    log l_j = -log(diag(P_Z)_j + eps), shifted so that the k coordinates with the largest
    diag(P_Z) start below l_ref (inside Z) and the others above: the formula gives the
    shape, the data's l_ref the scale. Unshifted, 1/(diag(P_Z) + eps) is far below l_ref on
    standardised data for almost every coordinate, and Z would start with nearly all d of them."""
    if start == "cold":
        return torch.full_like(z_energy, math.log(l_ref))
    log_l = -torch.log(z_energy + eps)
    ordered = torch.sort(log_l).values
    anchor = (ordered[k - 1] + ordered[k]) / 2 if k < len(ordered) else ordered[-1] + 1
    return log_l - anchor + math.log(l_ref)


def summarise_fit(log_l, log_l_ref, z_energy):
    """|Z| (l < l_ref), z_size_rel (w >= REL_THRESHOLD * max w), spectrum stats and SVD overlap."""
    in_z = (log_l < log_l_ref).numpy()
    w = torch.exp(-2 * log_l)
    log10 = log_l.numpy() / math.log(10)
    row = {"z_size": int(in_z.sum()), "z_size_rel": int((w >= REL_THRESHOLD * w.max()).sum()),
           "log10_l_min": float(log10.min()), "log10_l_median": float(np.median(log10)),
           "log10_l_max": float(log10.max())}
    row.update(ard_mmd.compute_overlap(in_z, z_energy.numpy()))
    return row


def fit_rows(data, layer, l_ref, objective, fits, log_l0, final, trace, stopped, z_energy, args):
    """Summary rows and trace rows of one batch of fits [(start, k, lambda)]. A summary row is one
    fit against one mask: a warm fit against the mask it started from, a cold fit against every
    k's (its rows differ only in the overlap columns). Trace rows: one set per fit, k None for
    the cold start."""
    with torch.no_grad():
        lambdas = torch.tensor([lam for _, _, lam in fits], device=data["train"][0].x.device)
        loss_final = ard_mmd.objective_fn(objective, *data["train"], args.tau, l_ref)(
            final.to(lambdas.device), lambdas)[0].cpu().numpy()
    scores = {f"{split}_{when}": ard_mmd.evaluate_retrieval(*data[split], ll, args.tau)
              for split in ("val", "test") for when, ll in (("init", log_l0), ("final", final))}
    n_test = len(data["test"][0].x)
    rows, trace_rows = [], []
    for f, (start, k, lam) in enumerate(fits):
        for mask_k in (args.k if k is None else [k]):
            row = {"layer": layer, "objective": objective, "start": start, "k": mask_k,
                   "lambda": lam, "l_ref": l_ref, "steps_run": int(stopped[f]),
                   "plateaued": bool(stopped[f] < args.steps), "loss_init": float(trace[0, f, 0]),
                   "loss_final": float(loss_final[f])}
            row.update(summarise_fit(final[f], math.log(l_ref), z_energy[mask_k]))
            for key, (acc, ce) in scores.items():
                row[f"retrieval_{key}"], row[f"ce_{key}"] = float(acc[f]), float(ce[f])
            row.update(retrieval_chance_test=1 / n_test, ce_chance_test=math.log(n_test))
            rows.append(row)
        trace_rows += [{"layer": layer, "objective": objective, "start": start, "k": k,
                        "lambda": lam, "step": i * args.log_every,
                        **dict(zip(TRACE_COLUMNS, values))}
                       for i, values in enumerate(trace[:, f].tolist())
                       if not math.isnan(values[0])]
    return rows, trace_rows


def compute_layer_fits(data, layer, layer_info, objective, z_energy, args, progress):
    """All (start, k, lambda) fits of one objective at one layer (fit_list), as one batch.
    z_energy: {k: diag(P_Z) (d,)}. Returns the unit: dict with layer, objective, fits [(start, k,
    lambda)], log_l (F, d), rows, traces, layer_info, seconds. `progress` (a tqdm bar) moves one
    per Adam step."""
    zh, en = data["train"]
    l_ref = layer_info["l_ref"]
    fits = fit_list(args)
    any_mask = next(iter(z_energy.values()))  # the cold start reads only its shape
    log_l0 = torch.stack([initial_log_l(s, any_mask if k is None else z_energy[k], l_ref,
                                        args.warm_eps, k) for s, k, _ in fits])
    lambdas = torch.tensor([lam for _, _, lam in fits], device=zh.x.device)
    steps_taken = [0]

    def on_step():
        steps_taken[0] += 1
        progress.update(1)

    t0 = time.time()
    final, trace, stopped = ard_mmd.fit_lengthscales(
        ard_mmd.objective_fn(objective, zh, en, args.tau, l_ref), log_l0.to(zh.x.device),
        lambdas, math.log(l_ref), args, on_step=on_step)
    progress.update(args.steps - steps_taken[0])  # the plateau stop skipped these
    seconds = time.time() - t0
    rows, traces = fit_rows(data, layer, l_ref, objective, fits, log_l0, final, trace, stopped,
                            z_energy, args)
    return {"layer": layer, "objective": objective, "fits": fits, "log_l": final, "rows": rows,
            "traces": traces, "layer_info": layer_info, "seconds": seconds}


def unit_path(out, layer, objective):
    return Path(out) / "fits" / f"layer{layer:03d}_{objective}.npz"


def save_unit(out, unit):
    """One finished (layer, objective) batch, written atomically (a crash never leaves half)."""
    path = unit_path(out, unit["layer"], unit["objective"])
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_suffix(".tmp")
    meta = {key: unit[key] for key in ("layer", "objective", "fits", "rows", "traces",
                                       "layer_info", "seconds")}
    with open(tmp, "wb") as handle:
        np.savez(handle, log_l=unit["log_l"].numpy(), meta=json.dumps(meta))
    tmp.replace(path)


def load_unit(path):
    with np.load(path) as npz:
        unit = json.loads(str(npz["meta"]))
        unit["log_l"] = torch.from_numpy(npz["log_l"])
    unit["fits"] = [tuple(f) for f in unit["fits"]]
    return unit


def compute_all(zh, en, layers, splits, z_energy, args, device, out=None):
    """Every (layer, objective) unit, in order. With `out`, each unit is written to out/fits/ as
    it finishes, units already there are skipped (--resume), and every unit returned is the one
    read back from disk, so resumed and uninterrupted runs give the same results."""
    from tqdm.auto import tqdm
    done = {(layer, obj) for layer in layers for obj in args.objective
            if out is not None and unit_path(out, layer, obj).is_file()}
    todo = [(layer, obj) for layer in layers for obj in args.objective if (layer, obj) not in done]
    units = {}
    with tqdm(total=len(todo) * args.steps, desc="ARD fits (Adam steps)",
              disable=not todo) as progress:  # nothing left (--resume): no empty bar
        for li, layer in enumerate(layers):
            objectives = [obj for obj in args.objective if (layer, obj) in todo]
            if not objectives:
                continue
            data, _, info = prepare_layer(zh, en, li, splits, args.standardise, device)
            for obj in objectives:
                progress.set_postfix_str(f"layer {layer}, {obj}")
                units[(layer, obj)] = compute_layer_fits(data, layer, info, obj, z_energy, args,
                                                         progress)
                if out is not None:
                    save_unit(out, units[(layer, obj)])
    if out is None:
        return [units[(layer, obj)] for layer in layers for obj in args.objective]
    return [load_unit(unit_path(out, layer, obj)) for layer in layers for obj in args.objective]


def mark_selected(fits):
    """selected = lowest validation cross-entropy per (layer, objective, start, k), a continuous
    score (validation retrieval accuracy saturates); ties go to the larger lambda. The cold
    start's rows of every k are one fit: they select the same lambda."""
    fits["selected"] = False
    for _, group in fits.groupby(["layer", "objective", "start", "k"]):
        best = group.sort_values(["ce_val_final", "lambda"], ascending=[True, False]).index[0]
        fits.loc[best, "selected"] = True
    return fits


# ----------------------------------------------------------------------------------------------
# Saving

def save_results(out, units, layers, z_energy, args):
    """summary.csv, traces.csv and lengthscales.npz from the units. log10_l is (layers,
    objectives, starts, ks, lambdas, d), the cold fit written at every k; z_energy (ks, d)."""
    import pandas as pd
    fits = mark_selected(pd.DataFrame([row for unit in units for row in unit["rows"]]))
    fits.to_csv(out / "summary.csv", index=False, float_format="%.6g")
    pd.DataFrame([row for unit in units for row in unit["traces"]]).to_csv(
        out / "traces.csv", index=False, float_format="%.6g")
    shape = (len(layers), len(args.objective), len(args.start), len(args.k), len(args.lambdas),
             len(z_energy[args.k[0]]))
    log10_l = np.full(shape, np.nan, dtype=np.float32)
    l_ref = {}
    for unit in units:
        l_ref[unit["layer"]] = unit["layer_info"]["l_ref"]
        for f, (start, k, lam) in enumerate(unit["fits"]):
            ks = list(range(len(args.k))) if k is None else [args.k.index(k)]
            log10_l[layers.index(unit["layer"]), args.objective.index(unit["objective"]),
                    args.start.index(start), ks, args.lambdas.index(lam)] = \
                unit["log_l"][f].numpy() / math.log(10)
    np.savez_compressed(out / "lengthscales.npz", log10_l=log10_l, layers=np.array(layers),
                        objectives=np.array(args.objective), starts=np.array(args.start),
                        ks=np.array(args.k), lambdas=np.array(args.lambdas),
                        z_energy=np.stack([z_energy[k].numpy() for k in args.k]),
                        log10_l_ref=np.array([math.log10(l_ref[layer]) for layer in layers]))
    return fits


def run_record(args, config, layers, basis_layer, pairs, splits):
    """What config.json says about this run besides the flags (written before any work, so an
    interrupted run can be resumed, and again at the end)."""
    n_layers = common.num_layers(config)
    return dict(
        layers=layers, layer_depths=args.layer_depths,
        layer_fractions=[round(layer / n_layers, 4) for layer in layers],
        basis_layer=basis_layer, depth=args.depth, k=list(args.k),
        primary_test=summary.primary_description(args.k),
        preregistration=prereg.record("C"),
        basis_layer_fraction=round(basis_layer / n_layers, 4), hidden_size=config.hidden_size,
        n_pairs=len(pairs), splits={k: [pairs[i]["id"] for i in v] for k, v in splits.items()},
        drop_first=not args.keep_first_token, drop_numbers=args.drop_numbers,
        standardisation=f"{args.standardise} (per layer, pooled zh+en tokens of training problems)",
        penalty="contrastive: 2N * lambda * mean_j (l_ref / l_j)^2; plan: lambda * sum_j 1/l_j",
        z_definition="|Z| = #{j : l_j < l_ref}, l_ref = median pairwise distance of standardised "
                     "training tokens (the cold start); z_size_rel: w_j >= 0.1 max w",
        selection="lambda per (layer, objective, start): lowest validation cross-entropy of the "
                  "contrastive retrieval (tau as fitted); ties: the larger lambda")


# ----------------------------------------------------------------------------------------------

def work(args, n_pairs, config):
    """The unit of C's time in the cost model (zcausal/cost.py): pairs x the fits (layers x
    objectives x starts x lambdas) x their most steps."""
    layers = len(args.layers or args.layer_depths or PLAN_LAYERS)
    fits = layers * len(args.objective) * len(args.start) * len(args.lambdas)
    return n_pairs * fits * args.steps


def main(args):
    runs.validate_common(args)
    if args.replot:
        paths = summary.plot_all(args, Path(args.out))
        print("\n".join(summary.summary_lines(args.out)))
        print(f"wrote {', '.join(map(str, paths))}")
        return paths
    config, layers, basis_layer = validate(args)
    pairs = problems.load_pairs(args)
    splits = split_problems(len(pairs), args.val_frac, args.test_frac, args.seed)
    out = runs.prepare_out_dir(args.out, args.overwrite, args.resume, args, args.figures)
    record = run_record(args, config, layers, basis_layer, pairs, splits)
    runs.write_json(out / "config.json", runs.run_config(args, **record))
    runs.set_seed(args.seed)
    model, tokenizer = common.load_model(args.model, dtype=args.dtype, device=args.device,
                                         seed=args.seed, device_map=args.device_map)
    device = common.input_device(model)
    z_energy = compute_z_energy(model, basis_layer, args.k, args.fold_norm)
    zh, en, n_shared = load_clouds(model, tokenizer, pairs, layers, args)
    units = compute_all(zh, en, layers, splits, z_energy, args, device, out=out)
    fits = save_results(out, units, layers, z_energy, args)
    texts = [p["zh"] for p in pairs] + [p["en"] for p in pairs]
    runs.write_json(out / "config.json", runs.run_config(
        args, model, **record, fit_seconds=sum(unit["seconds"] for unit in units),
        fit_device=str(device), pairs_with_shared_prefix=n_shared,
        tokens=common.number_token_counts(tokenizer, texts),
        layer_info={unit["layer"]: unit["layer_info"] for unit in units}))
    paths = summary.plot_all(args, out)
    print("\n".join(summary.summary_lines(out)))
    print(f"wrote {out} and {', '.join(map(str, paths[1:]))}")
    return fits


if __name__ == "__main__":
    runs.run_cli(main, parse_args())
