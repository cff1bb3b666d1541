"""Experiment B: how much of each layer's residual update lies in Z, in each language.

    python exp_b_residual.py --model Qwen/Qwen2.5-3B --depth 0.889 --k 50    # layer 32 of 36
    python exp_b_residual.py --model tiny-random --smoke                   # smoke run, seconds

For every transition l -> l+1 (and embeddings -> layer 0) and every bare question text (en and zh),
the mean-pooled update u = mean_t h_{l+1}[t] - mean_t h_l[t] (the mean of the update is the
difference of the pooled means, so pooled layer outputs are extracted once for layers -1..L-1; all
come from forward hooks, so L-2 -> L-1 is a true residual update, before the final norm). With the
Z basis V_Z of --layer (fixed for all transitions; by default layer 32 of 36 at the same
fraction of this model's depth):
  R = ||P_Z u|| / ||P_Zperp u||   (chance for an isotropic u: about sqrt(k / (d - k)), not 1)
  energy = ||P_Z u||^2 / ||u||^2  (chance k / d)
per prompt, averaged over zh, en and both, against two bands of --n-random random k-dim subspaces:
uniform (Haar) ones, and ones drawn with the covariance of the basis layer's pooled states
(stats.matched_random_basis), which favour the directions the residual stream varies in, as a
subspace read by attention may: residual updates are far from isotropic, so "more than a uniform
random subspace" can mean no more than "along the stream's main directions".
The first token (attention sink) is left out of the means unless --keep-first-token; the tokens of
numbers too with --drop-numbers. --k takes one or several dimensions (every table has a k column);
--n-random 0 leaves the random bands out ("not tested"). The primary test (zcausal/summaries/
exp_b.py): Z's R on the update into the basis layer's input, both languages, at k = 50 (else the
largest --k), ranked among the uniform (Haar) draws, one-sided; the matched draws shown beside.

Outputs under --out: per_prompt.csv, per_layer.csv, asymmetry.csv (R_zh - R_en per transition),
random_draws.csv, config.json; figure residual_ratio.png under --figures (the --out path mirrored).
--replot redraws the figure and prints the summary from the CSVs alone (no model).
"""
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import common
from zcausal import layer_choice, prereg, problems, runs, stats
from zcausal.runs import UsageError
from zcausal.summaries import exp_b as summary

DEFAULTS = dict(k=[50], n_random=stats.N_RANDOM, band=(2.5, 97.5))
# --smoke: flags left at their default take these values (a run of seconds on --model tiny-random)
SMOKE = dict(limit=8, k=[4, 8], n_random=5)


def parse_args(argv=None):
    parser = runs.make_parser(__doc__)
    common.add_common_args(parser, "exp_b")
    problems.add_pairs_args(parser)
    layer_choice.add_layer_args(parser, ", used for every transition")
    parser.add_argument("--k", type=int, nargs="+", default=DEFAULTS["k"],
                        help="Z dimensions (one or several)")
    parser.add_argument("--n-random", type=int, default=DEFAULTS["n_random"],
                        help=f"random k-dim subspaces of each kind for the chance bands and the "
                             f"rank test (0: none); {stats.N_RANDOM_WHY}")
    runs.add_smoke_arg(parser, SMOKE)
    common.add_activation_args(parser)
    return runs.apply_smoke(parser, parser.parse_args(argv), SMOKE)


def validate(args):
    """Check device, layer and k against the model config alone (nothing loaded, nothing written;
    the shared flags: runs.validate_common). Returns the config and the resolved basis layer."""
    common.check_runtime(args.device, args.dtype, args.device_map)
    config = common.load_model_config(args.model)
    basis_layer = layer_choice.resolve_layer(config, args.layer, args.depth)
    for k in args.k:
        common.check_k(config, k, allow_full=False)
    if len(set(args.k)) < len(args.k):
        raise UsageError(f"--k {' '.join(map(str, args.k))}: each k once")
    return config, basis_layer


# ----------------------------------------------------------------------------------------------
# Compute

def compute_updates(pooled):
    """pooled: (N, L+1, d) mean-pooled outputs of layers -1..L-1 -> updates (N, L, d) float64,
    column j the transition j-1 -> j (j=0: embeddings -> layer 0)."""
    pooled = torch.as_tensor(pooled, dtype=torch.float64)
    return pooled[:, 1:] - pooled[:, :-1]


def compute_ratios(updates, basis):
    """R and energy per update for one or several bases.

    updates: (..., d); basis: (k, d) or (M, k, d). Returns dict of float64 arrays with the
    shape of updates[..., 0] (prefixed by M for a stack of bases): norm, norm_z, norm_zperp, R,
    energy. Computed as ||u||^2 - ||V u||^2 for Z-perp, so no d x d projector is formed.
    """
    updates = torch.as_tensor(updates, dtype=torch.float64)
    basis = torch.as_tensor(basis, dtype=torch.float64)
    total = (updates ** 2).sum(-1)
    if basis.dim() == 2:
        along = ((updates @ basis.T) ** 2).sum(-1)
    else:
        along = (torch.einsum("...d,mkd->m...k", updates, basis) ** 2).sum(-1)
        total = total.expand_as(along)
    perp = (total - along).clamp(min=0)
    out = {"norm": total.sqrt(), "norm_z": along.sqrt(), "norm_zperp": perp.sqrt(),
           "R": along.sqrt() / perp.sqrt().clamp(min=1e-30),
           "energy": along / total.clamp(min=1e-30)}
    return {name: value.numpy() for name, value in out.items()}


def random_seeds(seed, n):
    return [int(seed) * 100003 + i for i in range(n)]


def random_bases(d, k, n, seed):
    """n Haar-random (k, d) bases, stacked (n, k, d), and their seeds."""
    seeds = random_seeds(seed, n)
    return torch.stack([common.random_basis(d, k, s) for s in seeds]), seeds


def matched_bases(cov_sqrt, k, n, seed):
    """n random (k, d) bases drawn with a covariance (stats.matched_random_basis), stacked, and
    their seeds: subspaces that favour the directions the residual stream varies in, as Z may."""
    seeds = random_seeds(seed, n)
    return torch.stack([torch.from_numpy(stats.matched_random_basis(cov_sqrt, k, s))
                        for s in seeds]), seeds


def transition_frame(n_layers):
    from_layer = np.arange(-1, n_layers - 1)
    names = ["emb->0"] + [f"{l}->{l + 1}" for l in range(n_layers - 1)]
    return pd.DataFrame({"from_layer": from_layer, "to_layer": from_layer + 1, "transition": names})


def compute_per_prompt(ratios, pairs):
    """Long table: one row per (text, transition). ratios arrays are (2N, L), zh rows first."""
    n, n_trans = len(pairs), ratios["R"].shape[1]
    trans = transition_frame(n_trans)
    rows = pd.DataFrame({
        "id": np.repeat([p["id"] for p in pairs] * 2, n_trans),
        "lang": np.repeat(["zh"] * n + ["en"] * n, n_trans),
        "from_layer": np.tile(trans["from_layer"], 2 * n),
        "to_layer": np.tile(trans["to_layer"], 2 * n)})
    for name in ("norm", "norm_z", "norm_zperp", "R", "energy"):
        rows[name] = ratios[name].reshape(-1)
    return rows


def lang_masks(n):
    zh = np.r_[np.ones(n, bool), np.zeros(n, bool)]
    return {"zh": zh, "en": ~zh, "all": np.ones(2 * n, bool)}


def compute_random_draws(rand_ratios, n, seeds, kind):
    """Per draw, transition and language group: the mean R and energy over prompts."""
    frames = []
    n_draws, _, n_trans = rand_ratios["R"].shape
    trans = transition_frame(n_trans)
    for lang, mask in lang_masks(n).items():
        for m in range(n_draws):
            frame = trans[["from_layer", "to_layer"]].copy()
            frame.insert(0, "kind", kind)
            frame.insert(1, "draw", m)
            frame.insert(2, "seed", seeds[m])
            frame["lang"] = lang
            frame["R_mean"] = rand_ratios["R"][m][mask].mean(0)
            frame["energy_mean"] = rand_ratios["energy"][m][mask].mean(0)
            frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def compute_per_layer(per_prompt, draws, k, d, band=DEFAULTS["band"]):
    """Per transition and language group (zh, en, all): means of R and energy, chance values, and
    for each kind of random subspace the band (percentiles `band` of the per-draw means) and the
    share of draws whose R is at least Z's (frac_<prefix>_R_ge: Z's empirical rank)."""
    both = per_prompt.assign(lang="all")
    grouped = pd.concat([per_prompt, both]).groupby(["from_layer", "to_layer", "lang"], sort=False)
    table = grouped.agg(n=("R", "size"), R_mean=("R", "mean"), R_sem=("R", "sem"),
                        R_median=("R", "median"), energy_mean=("energy", "mean"),
                        energy_sem=("energy", "sem"), norm_mean=("norm", "mean")).reset_index()
    table["R_chance"] = np.sqrt(k / (d - k))
    table["energy_chance"] = k / d
    table["R_over_chance"] = table["R_mean"] / table["R_chance"]
    table["energy_over_chance"] = table["energy_mean"] / table["energy_chance"]
    for kind, prefix in summary.KINDS.items():
        if not (draws["kind"] == kind).any():  # --n-random 0: no band, not tested
            for name in ("R", "energy"):
                for stat in ("mean", "lo", "hi"):
                    table[f"{prefix}_{name}_{stat}"] = np.nan
            table[summary.rank_column(kind, "R")] = np.nan
            continue
        rand = draws[draws["kind"] == kind].groupby(["from_layer", "lang"])
        columns = {f"{prefix}_{name}_{stat}": value for name in ("R", "energy") for stat, value in (
            ("mean", rand[f"{name}_mean"].mean()),
            ("lo", rand[f"{name}_mean"].quantile(band[0] / 100)),
            ("hi", rand[f"{name}_mean"].quantile(band[1] / 100)))}
        table = table.merge(pd.DataFrame(columns).reset_index(), on=["from_layer", "lang"],
                            how="left")
        merged = draws[draws["kind"] == kind].merge(
            table[["from_layer", "lang", "R_mean"]], on=["from_layer", "lang"], suffixes=("", "_z"))
        frac = (merged["R_mean"] >= merged["R_mean_z"]).groupby(
            [merged["from_layer"], merged["lang"]]).mean()
        table = table.merge(frac.rename(summary.rank_column(kind, "R")).reset_index(),
                            on=["from_layer", "lang"], how="left")
    return table.sort_values(["lang", "from_layer"], key=_lang_order).reset_index(drop=True)


def _lang_order(col):
    return col.map({"zh": 0, "en": 1, "all": 2}) if col.name == "lang" else col


def compute_asymmetry(per_prompt, draws, band=DEFAULTS["band"]):
    """Per transition, the paired difference R_zh - R_en over problems, a Wilcoxon
    signed-rank p-value (uncorrected), and the same difference under each kind of random subspace:
    its band and the share of draws whose |difference| is at least Z's."""
    from scipy.stats import wilcoxon
    wide = per_prompt.pivot_table(index=["from_layer", "to_layer", "id"], columns="lang", values="R")
    diff = (wide["zh"] - wide["en"]).rename("diff")
    rows = []
    for (from_layer, to_layer), d in diff.groupby(level=[0, 1]):
        d = d.to_numpy()
        p = wilcoxon(d).pvalue if len(d) > 1 and np.any(d != 0) else np.nan
        rows.append({"from_layer": from_layer, "to_layer": to_layer, "n_pairs": len(d),
                     "R_zh": wide.loc[(from_layer, to_layer), "zh"].mean(),
                     "R_en": wide.loc[(from_layer, to_layer), "en"].mean(),
                     "diff_mean": d.mean(), "diff_sem": d.std(ddof=1) / np.sqrt(len(d))
                     if len(d) > 1 else np.nan, "wilcoxon_p": p})
    table = pd.DataFrame(rows)
    for kind, prefix in summary.KINDS.items():
        if not (draws["kind"] == kind).any():  # --n-random 0: no band, not tested
            for stat in ("mean", "lo", "hi"):
                table[f"{prefix}_diff_{stat}"] = np.nan
            table[summary.rank_column(kind, "absdiff")] = np.nan
            continue
        rand = draws[(draws["lang"] != "all") & (draws["kind"] == kind)].pivot_table(
            index=["from_layer", "draw"], columns="lang", values="R_mean")
        rand_diff = (rand["zh"] - rand["en"]).rename("rand")
        by_layer = rand_diff.groupby(level=0)
        table[f"{prefix}_diff_mean"] = table["from_layer"].map(by_layer.mean())
        table[f"{prefix}_diff_lo"] = table["from_layer"].map(by_layer.quantile(band[0] / 100))
        table[f"{prefix}_diff_hi"] = table["from_layer"].map(by_layer.quantile(band[1] / 100))
        # zh and en updates differ in direction, so any subspace shows some R_zh - R_en: the fair
        # question is whether Z's difference is larger than a random subspace's
        merged = rand_diff.reset_index().merge(table[["from_layer", "diff_mean"]], on="from_layer")
        exceeds = merged["rand"].abs() >= merged["diff_mean"].abs()
        table[summary.rank_column(kind, "absdiff")] = table["from_layer"].map(
            exceeds.groupby(merged["from_layer"]).mean())
    return table


DRAW_COLUMNS = ["kind", "draw", "seed", "from_layer", "to_layer", "lang", "R_mean", "energy_mean"]


def compute_all(pooled, pairs, basis, k, d, n_random, seed, basis_layer):
    """pooled: (2N, L+1, d), zh texts then en texts, column j the output of layer j - 1. Returns
    the four tables of this k (each with a k column) and the variance shares (of the basis
    layer's pooled outputs) of Z and of the two kinds of random subspace (NaN without draws)."""
    updates = compute_updates(pooled)
    per_prompt = compute_per_prompt(compute_ratios(updates, basis), pairs)
    cov = stats.covariance(torch.as_tensor(pooled)[:, basis_layer + 1].double().numpy())
    cov_sqrt = stats.covariance_sqrt(cov)
    draws, shares = [], {"z": stats.variance_share(basis.double().numpy(), cov)}
    for kind in summary.KINDS:
        if n_random == 0:
            shares[kind] = float("nan")
            continue
        bases, seeds = (random_bases(d, k, n_random, seed) if kind == "uniform"
                        else matched_bases(cov_sqrt, k, n_random, seed))
        draws.append(compute_random_draws(compute_ratios(updates, bases), len(pairs), seeds, kind))
        shares[kind] = float(np.mean([stats.variance_share(b.double().numpy(), cov)
                                      for b in bases]))
    # an empty frame in the concat would turn every column into objects
    draws = pd.concat(draws, ignore_index=True) if draws else pd.DataFrame(columns=DRAW_COLUMNS)
    tables = {"per_prompt": per_prompt, "per_layer": compute_per_layer(per_prompt, draws, k, d),
              "asymmetry": compute_asymmetry(per_prompt, draws), "random_draws": draws}
    return {name: table.assign(k=k) for name, table in tables.items()}, shares


# ----------------------------------------------------------------------------------------------
# Save and plot

def save_tables(out_dir, tables, extra_columns):
    for name, table in tables.items():
        table = table.copy()
        for col, value in extra_columns.items():
            table[col] = value
        table.to_csv(Path(out_dir) / f"{name}.csv", index=False)


# ----------------------------------------------------------------------------------------------


def run_record(args, config, basis_layer, pairs):
    """What config.json says about this run besides the flags (written before any work, so an
    interrupted run can be resumed, and again at the end with the model's details)."""
    n_layers, d = common.num_layers(config), common.hidden_size(config)
    return dict(basis_layer=basis_layer, depth=args.depth,
                basis_layer_fraction=round(basis_layer / n_layers, 4), k=list(args.k), d=d,
                n_layers=n_layers, drop_first=not args.keep_first_token,
                drop_numbers=args.drop_numbers, n_pairs=len(pairs), n_texts=2 * len(pairs),
                n_random=args.n_random, random_seeds=random_seeds(args.seed, args.n_random),
                band_percentiles=list(DEFAULTS["band"]),
                texts="bare questions, zh and en, no template",
                R_chance={k: float(np.sqrt(k / (d - k))) for k in args.k},
                energy_chance={k: k / d for k in args.k},
                primary_test=summary.primary_description(args.k),
                preregistration=prereg.record("B"))


def work(args, n_pairs, config):
    """The unit of B's time in the cost model (zcausal/cost.py): pairs x k (the forward passes grow
    with the pairs, the bases, tables and figures with k; the random bands are cheap)."""
    return n_pairs * len(args.k)


def main(args):
    runs.validate_common(args)
    if args.replot:
        paths = [summary.plot_all(args)]
        print("\n".join(summary.summary_lines(args.out)))
        print(f"wrote {', '.join(map(str, paths))}")
        return paths
    config, basis_layer = validate(args)
    pairs = problems.load_pairs(args)
    out_dir = runs.prepare_out_dir(args.out, args.overwrite, args.resume, args, args.figures)
    record = run_record(args, config, basis_layer, pairs)
    runs.write_json(out_dir / "config.json", runs.run_config(args, **record))
    runs.set_seed(args.seed)
    model, tokenizer = common.load_model(args.model, args.dtype, args.device, seed=args.seed,
                                         device_map=args.device_map)
    texts = [p["zh"] for p in pairs] + [p["en"] for p in pairs]
    pooled = common.extract_activations(
        model, tokenizer, texts, list(range(-1, record["n_layers"])), pool="mean",
        drop_first=record["drop_first"], drop_numbers=args.drop_numbers,
        batch_size=args.batch_size, cache_dir=args.cache_dir)
    tables, shares = {}, {}
    for k in args.k:
        basis = common.z_basis(model, basis_layer, k, fold_norm=args.fold_norm)
        tables_k, shares[k] = compute_all(pooled, pairs, basis, k, record["d"], args.n_random,
                                          args.seed, basis_layer)
        for name, table in tables_k.items():
            tables[name] = pd.concat([tables[name], table], ignore_index=True) \
                if name in tables else table
    save_tables(out_dir, tables, {key: record[key] for key in
                                  ("basis_layer", "d", "drop_first", "drop_numbers")})
    runs.write_json(out_dir / "config.json", runs.run_config(
        args, model, **record, tokens=common.number_token_counts(tokenizer, texts),
        variance_share_of_basis_layer_states=shares))
    print("\n".join(summary.summary_lines(out_dir)))
    path = summary.plot_all(args)
    print(f"wrote {out_dir} and {path}")
    return tables


if __name__ == "__main__":
    runs.run_cli(main, parse_args())
