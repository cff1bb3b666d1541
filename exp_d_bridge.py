"""Experiment D: is the zh <-> en map inside Z a simple linear transform?

    python exp_d_bridge.py --model Qwen/Qwen2.5-3B --depth 0.889 --k 20 50 \
        --prompts-en mgsm_en.tsv --prompts-zh mgsm_zh.tsv       # layer 32 of 36, MGSM's 250 pairs
    python exp_d_bridge.py --model tiny-random --smoke         # smoke run, seconds

Paired Z coordinates of the mean-pooled bare questions at --layer (by default layer 32 of 36 at
the same fraction of this model's depth): Z_lang = pooled_lang @ V_Z.T (N x k; the first
token is left out unless --keep-first-token, the tokens of numbers too with --drop-numbers). Maps
Z_zh ~ Z_en W + b:
  lstsq       least squares (minimum-norm via lstsq when singular)
  ridge       penalty chosen on the training rows only, by their closed-form leave-one-out error
  procrustes  W = U V^T from the SVD of Xc^T Yc (orthogonal)
  identity    W = I, b = 0: zero parameters (both sides use the same basis, so it is a hypothesis)
  mean_shift  W = I, b = mean(Y) - mean(X): the language offset alone
Fitted maps centre X and Y with the training rows' means (the intercept b). For each: in-sample R^2,
held-out R^2 by leave-one-out and n-fold (--n-folds, default 10), a shuffled-pairs null of the
n-fold R^2, top-1 retrieval of the mapped vectors among the true Z_zh (chance 1/N),
||W^T W - I||_F / k and the singular values. Is Z special? --n-random Haar-random k-dim bases
(default 19) are fitted in the same run on the same folds, and Z's n-fold R^2 is ranked among
theirs per map and k (stats.rank_test: Z as one more draw; one-sided p = (1 + #{draws >= Z}) /
(M + 1), at least 1 / (M + 1)). The primary test is least squares at k = 50 (the largest --k where
50 is not run); the other maps and k are Holm-corrected. --n-random 0 leaves the comparison out
("not tested").
R^2 = 1 - ||Y - Yhat||_F^2 / ||Y - mean(Y)||_F^2, with the mean over all N rows. With N <= k + 1
least squares interpolates (in-sample R^2 = 1 whatever the data): only held-out numbers mean
anything, and they need N well above k (MGSM's 250 pairs for k = 50).

Outputs under --out: metrics.csv (one row per k and map; random_* columns: Z among the random
bases), singular_values.csv, null.csv, random_draws.csv (the n-fold R^2 of every random basis),
config.json; figures singular_values.png and heldout_r2.png (with the random band) under --figures
(the --out path mirrored). --replot redraws them and prints the summary from the CSVs alone (no
model).
"""
from pathlib import Path

import numpy as np
import pandas as pd

import common
from zcausal import layer_choice, prereg, problems, runs, stats
from zcausal.conditions import random_seed
from zcausal.runs import UsageError
from zcausal.summaries import exp_d as summary

DEFAULTS = dict(k=[20, 50], n_shuffles=100, n_folds=10, n_random=stats.N_RANDOM,
                band=(2.5, 97.5))
# --smoke: flags left at their default take these values (a run of seconds on --model tiny-random)
SMOKE = dict(limit=24, k=[4, 8], n_shuffles=20, n_folds=5)
RIDGE_GRID = np.logspace(-4, 3, 15)  # times the mean eigenvalue of the training Xc^T Xc


def parse_args(argv=None):
    parser = runs.make_parser(__doc__)
    common.add_common_args(parser, "exp_d")
    problems.add_pairs_args(parser)
    layer_choice.add_layer_args(parser, ", whose activations are mapped")
    parser.add_argument("--k", type=int, nargs="+", default=DEFAULTS["k"], help="Z dimensions")
    parser.add_argument("--n-shuffles", type=int, default=DEFAULTS["n_shuffles"],
                        help="shuffled-pairs null draws")
    parser.add_argument("--n-folds", type=int, default=DEFAULTS["n_folds"],
                        help="folds for the k-fold held-out R^2")
    parser.add_argument("--n-random", type=int, default=DEFAULTS["n_random"],
                        help=f"Haar-random k-dim bases fitted beside Z, per k (0: no comparison); "
                             f"{stats.N_RANDOM_WHY}")
    runs.add_smoke_arg(parser, SMOKE)
    common.add_activation_args(parser)
    return runs.apply_smoke(parser, parser.parse_args(argv), SMOKE)


def validate(args):
    """Check device, layer and k against the model config alone (nothing loaded, nothing written;
    the shared flags: runs.validate_common). Returns the config and the resolved layer."""
    common.check_runtime(args.device, args.dtype, args.device_map)
    config = common.load_model_config(args.model)
    layer = layer_choice.resolve_layer(config, args.layer, args.depth)
    for k in args.k:
        common.check_k(config, k, allow_full=False,
                       why="k = d makes Z the whole space, where any basis is a rotation of Z")
    if len(set(args.k)) < len(args.k):
        raise UsageError(f"--k {' '.join(map(str, args.k))}: each k once")
    return config, layer


def limit_blas_threads(n=1):
    """Limit numpy's BLAS to n threads for the rest of the process; returns whether a BLAS library
    was found. These fits are small (N x k), where one thread is fastest, and on a busy shared CPU
    BLAS threads spin-wait: the null took 150x longer with 2 threads on a loaded 2-core machine."""
    from threadpoolctl import threadpool_info, threadpool_limits
    threadpool_limits(limits=n, user_api="blas")
    return any(lib["user_api"] == "blas" for lib in threadpool_info())


# ----------------------------------------------------------------------------------------------
# Maps: each fit returns (W (k, k), b (k,), alpha); the prediction is X @ W + b

def _centre(X, Y):
    mx, my = X.mean(0), Y.mean(0)
    return X - mx, Y - my, mx, my


def ridge_alpha(Xc, Yc, grid=RIDGE_GRID):
    """The penalty with the smallest leave-one-out error on these (training) rows alone.

    Closed form for ridge with an unpenalised intercept: residual_i / (1 - H_ii), with
    H = 11^T/n + U diag(s^2 / (s^2 + a)) U^T from the SVD Xc = U S V^T; vectorised over the grid.
    """
    n = len(Xc)
    U, s, _ = np.linalg.svd(Xc, full_matrices=False)
    alphas = grid * max((s ** 2).sum() / Xc.shape[1], 1e-300)
    shrink = s ** 2 / (s ** 2 + alphas[:, None])  # (A, r)
    fitted = (U * shrink[:, None, :]) @ (U.T @ Yc)  # (A, n, k), centred
    leverage = 1.0 / n + shrink @ (U ** 2).T  # (A, n)
    with np.errstate(divide="ignore", invalid="ignore"):
        loo = (Yc[None] - fitted) / (1 - leverage)[..., None]
    errors = np.where(np.isfinite(loo), loo ** 2, np.inf).sum((1, 2))
    errors[np.any(1 - leverage < 1e-10, 1)] = np.inf  # interpolating: LOO undefined
    return float(alphas[np.argmin(errors)]) if np.isfinite(errors).any() else float(alphas[-1])


def fit_map(name, X, Y):
    """Fit one map on rows X, Y (n, k) float64. Only these rows are used, centring included."""
    k = X.shape[1]
    if name == "identity":
        return np.eye(k), np.zeros(k), np.nan
    Xc, Yc, mx, my = _centre(X, Y)
    alpha = np.nan
    if name == "mean_shift":
        W = np.eye(k)
    elif name == "lstsq":
        W = np.linalg.lstsq(Xc, Yc, rcond=None)[0]
    elif name == "ridge":
        alpha = ridge_alpha(Xc, Yc)
        W = np.linalg.solve(Xc.T @ Xc + alpha * np.eye(k), Xc.T @ Yc)
    elif name == "procrustes":
        U, _, Vt = np.linalg.svd(Xc.T @ Yc)
        W = U @ Vt
    else:
        raise ValueError(f"unknown map {name!r}")
    return W, my - mx @ W, alpha


def n_params(name, k):
    return {"lstsq": k * k + k, "ridge": k * k + k, "procrustes": k * (k - 1) // 2 + k,
            "identity": 0, "mean_shift": k}[name]


# ----------------------------------------------------------------------------------------------
# Metrics

def r2(Y, Yhat):
    """1 - ||Y - Yhat||_F^2 / ||Y - mean(Y)||_F^2 (mean over all rows of Y)."""
    return float(1 - ((Y - Yhat) ** 2).sum() / ((Y - Y.mean(0)) ** 2).sum())


def orthogonality_error(W):
    return float(np.linalg.norm(W.T @ W - np.eye(len(W))) / len(W))


def retrieval_top1(Yhat, Y):
    """Share of rows whose mapped vector is nearest (Euclidean) to its own partner among all Y."""
    dist = (Yhat ** 2).sum(1)[:, None] - 2 * Yhat @ Y.T + (Y ** 2).sum(1)[None]
    return float(np.mean(dist.argmin(1) == np.arange(len(Y))))


def kfold_indices(n, n_folds, seed):
    """Test-index arrays of a seeded random partition into min(n_folds, n) folds."""
    perm = np.random.default_rng(seed).permutation(n)
    return np.array_split(perm, min(n_folds, n))


def heldout_predictions(name, X, Y, folds):
    """Predictions for each fold's rows from a map fitted on the other rows only."""
    Yhat = np.empty_like(Y)
    for test in folds:
        train = np.ones(len(X), bool)
        train[test] = False
        W, b, _ = fit_map(name, X[train], Y[train])
        Yhat[test] = X[test] @ W + b
    return Yhat


def compute_null(X, Y, folds, n_shuffles, seed):
    """n-fold held-out R^2 per map with the pairing shuffled: dict map -> (n_shuffles,)."""
    rng = np.random.default_rng(seed)
    perms = [rng.permutation(len(Y)) for _ in range(n_shuffles)]
    from tqdm.auto import tqdm
    return {name: np.array([r2(Y[p], heldout_predictions(name, X, Y[p], folds))
                            for p in tqdm(perms, desc=f"null {name}", leave=False)])
            for name in summary.MAPS}


def compute_map_metrics(name, X, Y, folds, null, band=DEFAULTS["band"]):
    """One metrics row and the singular values for one map. X = Z_en, Y = Z_zh, (N, k)."""
    n, k = X.shape
    W, b, alpha = fit_map(name, X, Y)
    fitted = X @ W + b
    loo = heldout_predictions(name, X, Y, [np.array([i]) for i in range(n)])
    kfold_r2 = r2(Y, heldout_predictions(name, X, Y, folds))
    sv = np.linalg.svd(W, compute_uv=False)
    row = {"map": name, "k": k, "n_pairs": n, "n_params": n_params(name, k), "alpha": alpha,
           "in_sample_r2": r2(Y, fitted), "loo_r2": r2(Y, loo), "kfold_r2": kfold_r2,
           "n_folds": len(folds), "null_mean": null.mean(),
           "null_lo": np.percentile(null, band[0]), "null_hi": np.percentile(null, band[1]),
           "null_max": null.max(), "n_shuffles": len(null),
           "p_null": (1 + np.sum(null >= kfold_r2)) / (len(null) + 1),
           "retrieval_in_sample": retrieval_top1(fitted, Y), "retrieval_loo": retrieval_top1(loo, Y),
           "retrieval_chance": 1 / n, "orthogonality_error": orthogonality_error(W),
           "sv_max": sv.max(), "sv_min": sv.min(), "underdetermined": n - 1 <= k,
           "in_sample_exact": name == "lstsq" and n - 1 <= k}
    return row, sv


def compute_bridge(X, Y, n_shuffles, n_folds, seed):
    """All maps for one k: (metrics rows, singular-value rows, null rows)."""
    folds = kfold_indices(len(X), n_folds, seed)
    null = compute_null(X, Y, folds, n_shuffles, seed + 1)
    rows, svs, nulls = [], [], []
    for name in summary.MAPS:
        row, sv = compute_map_metrics(name, X, Y, folds, null[name])
        rows.append(row)
        svs += [{"map": name, "k": X.shape[1], "index": i, "sigma": s} for i, s in enumerate(sv)]
        nulls += [{"map": name, "k": X.shape[1], "shuffle": j, "kfold_r2": v}
                  for j, v in enumerate(null[name])]
    return rows, svs, nulls


def z_coordinates(pooled, basis):
    """pooled (N, d), basis (k, d) -> (N, k) float64 coordinates in Z."""
    return np.asarray(pooled, np.float64) @ np.asarray(basis, np.float64).T


# ----------------------------------------------------------------------------------------------
# Random bases: is Z special?

def basis_r2(zh, en, basis, folds):
    """Held-out R^2 of each map in span(basis) on `folds`: zh, en (N, d) pooled states, basis
    (k, d) -> {map: R^2}."""
    Y, X = z_coordinates(zh, basis), z_coordinates(en, basis)
    return {name: r2(Y, heldout_predictions(name, X, Y, folds)) for name in summary.MAPS}


def compute_random_draws(zh, en, k, n_random, folds, seed):
    """The same held-out fits in n_random Haar-random k-dim bases (common.random_basis, seeded by
    conditions.random_seed, A's rule): one row per draw and map (k, map, draw, seed, kfold_r2)."""
    rows = []
    for draw in range(n_random):
        s = random_seed(seed, k, draw)
        basis = common.random_basis(zh.shape[1], k, s).numpy()
        rows += [{"k": k, "map": name, "draw": draw, "seed": s, "kfold_r2": value}
                 for name, value in basis_r2(zh, en, basis, folds).items()]
    return rows


RANDOM_COLUMNS = ("mean", "lo", "hi", "max", "rank", "p_above", "p_below", "p_two_sided")


def random_columns(value, draws, band=DEFAULTS["band"]):
    """Z's held-out R^2 `value` among the random bases' (`draws`): their band, Z's place from the
    top (random_rank 1: no draw at least as high; ties count against Z) and the rank test's
    p-values (stats.rank_test); NaN columns without draws."""
    test = stats.rank_test(value, draws)
    if not test:
        return {"n_random": 0, **{f"random_{c}": np.nan for c in RANDOM_COLUMNS}}
    draws = np.asarray(draws, float)
    return {"n_random": test["draws"], "random_mean": test["mean"],
            "random_lo": np.percentile(draws, band[0]), "random_hi": np.percentile(draws, band[1]),
            "random_max": test["max"], "random_rank": 1 + test["at_or_above"],
            "random_p_above": test["p_above"], "random_p_below": test["p_below"],
            "random_p_two_sided": test["p_two_sided"]}


def compute_k(zh, en, basis, n_shuffles, n_folds, n_random, seed):
    """Everything for one k: Z's maps (compute_bridge) with the random bases' columns, and the
    random draws' rows: (metrics rows, singular-value rows, null rows, draw rows). zh, en (N, d)
    pooled states of the same problems; basis (k, d), Z. Z and every random basis are fitted on
    the same folds."""
    Y, X = z_coordinates(zh, basis), z_coordinates(en, basis)
    rows, svs, nulls = compute_bridge(X, Y, n_shuffles, n_folds, seed)
    folds = kfold_indices(len(X), n_folds, seed)  # compute_bridge's folds
    draws = compute_random_draws(zh, en, len(basis), n_random, folds, seed)
    for row in rows:
        row.update(random_columns(row["kfold_r2"],
                                  [d["kfold_r2"] for d in draws if d["map"] == row["map"]]))
    return rows, svs, nulls, draws


def exactness_warning(n, k):
    if n - 1 > k:
        return None
    return (f"N={n} <= k+1={k + 1}: least squares (with its intercept) interpolates the data, so "
            f"its in-sample R^2 = 1 is exact by construction; W has rank <= N-1, so "
            f"||W^T W - I||_F / k >= {np.sqrt(k - n + 1) / k:.3f} whatever the data. "
            f"Read the held-out R^2 only.")


# ----------------------------------------------------------------------------------------------
# Save and plot


DRAW_COLUMNS = ["k", "map", "draw", "seed", "kfold_r2"]


def save_tables(out_dir, tables, extra_columns):
    """tables: name -> list of row dicts (random_draws may be empty: its header is still
    written)."""
    for name, records in tables.items():
        table = pd.DataFrame(records, columns=DRAW_COLUMNS if name == "random_draws" else None)
        for col, value in extra_columns.items():
            table[col] = value
        table.to_csv(Path(out_dir) / f"{name}.csv", index=False)


# ----------------------------------------------------------------------------------------------

def run_record(args, config, layer, pairs):
    """What config.json says about this run besides the flags (written before any work, so an
    interrupted run can be resumed, and again at the end)."""
    n = len(pairs)
    return dict(layer=layer, depth=args.depth,
                layer_fraction=round(layer / common.num_layers(config), 4), k=list(args.k),
                drop_first=not args.keep_first_token, drop_numbers=args.drop_numbers, n_pairs=n,
                maps=list(summary.MAPS), n_shuffles=args.n_shuffles, n_random=args.n_random,
                random_basis="Haar (common.random_basis), seed * 1000003 + k * 1009 + draw, "
                             "fitted on the same folds as Z",
                primary_test=summary.primary_description(args.k, args.n_folds),
                preregistration=prereg.record("D"),
                n_folds=args.n_folds, ridge_grid_times_mean_eigenvalue=RIDGE_GRID.tolist(),
                null_band_percentiles=list(DEFAULTS["band"]), direction="Z_zh ~ Z_en W + b",
                texts="bare questions, no template",
                exactness_warnings={k: exactness_warning(n, k) for k in args.k})


def work(args, n_pairs, config):
    """The unit of D's time in the cost model (zcausal/cost.py): pairs x k x folds x the maps
    fitted per fold (Z's, the shuffles' and the random bases')."""
    return n_pairs * len(args.k) * args.n_folds * (1 + args.n_shuffles + args.n_random)


def main(args):
    runs.validate_common(args)
    if args.replot:
        paths = summary.plot_all(args)
        print("\n".join(summary.summary_lines(args.out)))
        print(f"wrote {', '.join(map(str, paths))}")
        return paths
    config, layer = validate(args)
    pairs = problems.load_pairs(args)
    if len(pairs) < 3:
        raise UsageError(f"{len(pairs)} pairs are too few for held-out fits; pass at least 3")
    out_dir = runs.prepare_out_dir(args.out, args.overwrite, args.resume, args, args.figures)
    record = run_record(args, config, layer, pairs)
    runs.write_json(out_dir / "config.json", runs.run_config(args, **record))
    blas_limited = limit_blas_threads(1)
    runs.set_seed(args.seed)
    model, tokenizer = common.load_model(args.model, args.dtype, args.device, seed=args.seed,
                                         device_map=args.device_map)
    texts = [p["zh"] for p in pairs] + [p["en"] for p in pairs]
    # all of layers -1..L-1, like exp_b_residual.py: the same cache entry serves both scripts,
    # so D after B on the same pairs (and the same pooling flags) runs no forward pass
    layers = list(range(-1, common.num_layers(model)))
    pooled = common.extract_activations(
        model, tokenizer, texts, layers, pool="mean", drop_first=record["drop_first"],
        drop_numbers=args.drop_numbers, batch_size=args.batch_size,
        cache_dir=args.cache_dir)[:, layers.index(layer)].numpy()
    n = len(pairs)
    tables = {"metrics": [], "singular_values": [], "null": [], "random_draws": []}
    for k in args.k:
        warning = exactness_warning(n, k)
        if warning:
            print(f"warning (k={k}): {warning}")
        basis = common.z_basis(model, layer, k, fold_norm=args.fold_norm).numpy()
        for name, part in zip(tables, compute_k(pooled[:n], pooled[n:], basis, args.n_shuffles,
                                                args.n_folds, args.n_random, args.seed)):
            tables[name] += part  # pooled: zh rows first, then en
    tables["metrics"] = summary.mark_primary(pd.DataFrame(tables["metrics"])).to_dict("records")
    save_tables(out_dir, tables, {key: record[key] for key in
                                  ("layer", "drop_first", "drop_numbers")})
    runs.write_json(out_dir / "config.json", runs.run_config(
        args, model, **record, tokens=common.number_token_counts(tokenizer, texts),
        blas_threads_limited_to_1=blas_limited))
    print("\n".join(summary.summary_lines(out_dir)))
    paths = summary.plot_all(args)
    print(f"wrote {out_dir} and {', '.join(map(str, paths))}")
    return tables["metrics"]


if __name__ == "__main__":
    runs.run_cli(main, parse_args())
