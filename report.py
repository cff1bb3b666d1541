"""Build results/REPORT.md from whatever runs exist under a results folder, without a model.

    python report.py                                  # results/ -> results/REPORT.md
    python report.py --results results --out results/REPORT.md --figures figures

A run is any folder with a config.json whose command is one of the experiment scripts. Runs are
grouped by the model that made them. For each model and experiment the report gives the findings
in words (the same sentences the experiment prints at the end of its run, generated from its CSVs
by that experiment's own summary_lines), its figures, the command and config.json; then a table
across models at the depth-matched layers (each experiment's headline); and one figure that puts
every model's layer sweep (Experiment E) on a shared depth axis. Nothing in it depends on the
time it was built: rebuilding gives identical bytes.
"""
import json
import os
from pathlib import Path

from zcausal.summaries import exp_a, exp_b, exp_c, exp_d, exp_e
from zcausal import runs
from zcausal.runs import UsageError

# script -> (experiment letter, title, module with summary_lines(out) and headline(out))
EXPERIMENTS = {
    "exp_a_patching.py": ("A", "activation patching of Z", exp_a),
    "exp_b_residual.py": ("B", "residual-stream share of Z", exp_b),
    "exp_c_ard_mmd.py": ("C", "ARD-MMD search for a shared subspace", exp_c),
    "exp_d_bridge.py": ("D", "a linear bridge from en to zh in Z", exp_d),
    "exp_e_layer_sweep.py": ("E", "layer sweep and DAS", exp_e),
}
SWEEP_FIGURE = "report_sweep_by_depth.png"
# what reading a run folder that is still being written (or was interrupted) raises
UNFINISHED = (UsageError, FileNotFoundError, KeyError, IndexError, ValueError)


def find_runs(results):
    """Every run folder under `results` (sorted): dicts with path, script, model, config."""
    found = []
    for config_path in sorted(Path(results).rglob("config.json")):
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        script = config.get("script") or Path(str(config.get("command")).split(" ")[0]).name
        if script in EXPERIMENTS:
            model = Path(str(config.get("model", {}).get("name_or_path") or
                             config.get("args", {}).get("model"))).name
            found.append(dict(path=config_path.parent, script=script, model=model,
                              config=config))
    return found


def _rel(path, start):
    return Path(os.path.relpath(Path(path).resolve(), Path(start).resolve())).as_posix()


def run_section(run, results, report_dir, figures):
    """Markdown lines for one run: findings, figures, command, config.json."""
    letter, title, module = EXPERIMENTS[run["script"]]
    path, config = run["path"], run["config"]
    lines = [f"### {letter}: {title} (`{_rel(path, results)}`)", ""]
    try:
        lines += [" ".join(module.summary_lines(path)), ""]
    except UNFINISHED:
        lines += ["No results: the run has not finished (its folder holds too little to "
                  "summarise; rerun the command below with --resume).", ""]
    folder = runs.figure_dir(path, figures)
    for png in sorted(folder.glob("*.png")):
        lines.append(f"![{letter} {png.stem}]({_rel(png, report_dir)})")
    command = (["```", f"python {config['command']}", "```"] if config.get("command") else
               ["(started from Python, not as a command: the flags are config.json's args)"])
    lines += [""] + command + ["",
              f"Configuration: [{_rel(path / 'config.json', report_dir)}]"
              f"({_rel(path / 'config.json', report_dir)}); model "
              f"{config.get('model', {}).get('dtype', '?')} on "
              f"{config.get('model', {}).get('device_name', '?')}.", ""]
    return lines


def _layer(config):
    """'layer L of N (depth F)' of a run's patched or basis layer."""
    layer = (config.get("layers_resolved", {}).get("layer") or config.get("basis_layer")
             or config.get("layer") or config.get("args", {}).get("layer"))
    layer = layer[0] if isinstance(layer, list) else layer
    n = config.get("model", {}).get("num_layers") or config.get("n_layers")
    depth = config.get("args", {}).get("depth")
    depth = depth[0] if isinstance(depth, list) else depth
    return f"layer {layer} of {n}" + (f" (F = {depth})" if depth is not None else "")


def cross_model_table(found):
    """One row per run name (exp_a, exp_c_drop_numbers, ...), one column per model."""
    models = sorted({r["model"] for r in found})
    names = sorted({r["path"].name for r in found},
                   key=lambda n: (EXPERIMENTS[_script_of(found, n)][0], n))
    lines = ["| run | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
    for name in names:
        cells = []
        for model in models:
            run = next((r for r in found if r["model"] == model and r["path"].name == name), None)
            cells.append(_headline(run) if run else "-")
        letter = EXPERIMENTS[_script_of(found, name)][0]
        lines.append(f"| {letter}: `{name}` | " + " | ".join(cells) + " |")
    return lines


def _script_of(found, name):
    return next(r["script"] for r in found if r["path"].name == name)


def _headline(run):
    module = EXPERIMENTS[run["script"]][2]
    try:
        cell = module.headline(run["path"])
    except UNFINISHED:
        return "not finished"
    return (f"{cell['verdict']}: {cell['value']} [{_layer(run['config'])}]").replace("|", "\\|")


def plot_sweeps(found, path):
    """Transfer (swap source) against fraction of depth, full interchange and Z of the basis
    layer with the random band, one colour per model. Returns the path, or None without runs."""
    sweeps = []
    for run in found:
        if run["script"] == "exp_e_layer_sweep.py":
            try:
                sweeps.append((run, exp_e.swap_rows(run["path"])))
            except UNFINISHED:
                continue
    if not sweeps:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for colour, (run, swap) in zip(plt.cm.tab10.colors, sweeps):
        label = f"{run['model']} ({run['path'].name})"
        for condition, style in (("full", "-"), ("z_basis", "--")):
            part = swap[swap.condition == condition].sort_values("depth")
            ax.plot(part.depth, part.transfer, style, color=colour, marker=".",
                    label=f"{label}: {'full' if condition == 'full' else 'Z'}")
        rand = swap[swap.condition == "random"].sort_values("depth")
        ax.fill_between(rand.depth, rand.transfer_lo, rand.transfer_hi, color=colour, alpha=0.15,
                        label=f"{label}: random band")
        basis = run["config"].get("basis_layer")
        if basis is not None:
            ax.axvline(basis / run["config"]["model"]["num_layers"], color=colour, lw=0.8, ls=":")
    ax.axhline(0, color="0.5", lw=0.5)
    ax.set_xlabel("fraction of depth (layer / number of layers); dotted: Z's basis layer")
    ax.set_ylabel("transfer of the logit difference")
    ax.set_title("Layer sweep, last position, swap source: every model on one depth axis")
    ax.legend(fontsize=7)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return runs.save_figure(fig, path)


def build_report(results, out, figures):
    """The report's text (also written to `out`)."""
    results, out = Path(results), Path(out)
    found = find_runs(results)
    lines = ["# Report: every run under `" + runs.portable(results) + "`", "",
             "Generated by `python report.py` from the CSVs and config.json of each run (no "
             "model); rebuilding gives the same bytes. Each paragraph is the experiment's own "
             "summary of its numbers.", ""]
    missing = [f"{letter} ({title})" for script, (letter, title, _) in EXPERIMENTS.items()
               if not any(r["script"] == script for r in found)]
    if missing:
        lines += [f"No results under `{runs.portable(results)}` for: " + ", ".join(missing)
                  + ". Run the experiment's script with an --out below this folder.", ""]
    if found:
        lines += ["## Across models, at the depth-matched layer", ""]
        lines += cross_model_table(found) + [""]
        figure = plot_sweeps(found, Path(figures) / SWEEP_FIGURE)
        if figure:
            lines += [f"![layer sweeps by depth]({_rel(figure, out.parent)})", ""]
    for model in sorted({r["model"] for r in found}):
        lines += [f"## {model}", ""]
        runs_of_model = sorted((r for r in found if r["model"] == model),
                               key=lambda r: (EXPERIMENTS[r["script"]][0], r["path"].name))
        for run in runs_of_model:
            lines += run_section(run, results, out.parent, figures)
    text = "\n".join(lines).rstrip() + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    return text


def main(args):
    if not Path(args.results).is_dir():
        raise UsageError(f"--results {args.results}: no such folder; pass the folder that holds "
                         f"the runs (default results/)")
    text = build_report(args.results, args.out, args.figures)
    print(f"wrote {args.out} ({len(text.splitlines())} lines)")


def build_parser():
    parser = runs.make_parser(__doc__)
    parser.add_argument("--results", type=Path, default=runs.REPO / "results",
                        help="folder searched (recursively) for runs")
    parser.add_argument("--out", type=Path, default=runs.REPO / "results" / "REPORT.md",
                        help="the report file")
    parser.add_argument("--figures", type=Path, default=runs.REPO / "figures",
                        help="figures root the runs wrote to (their --figures); the depth "
                             "figure goes there too")
    return parser


if __name__ == "__main__":
    runs.run_cli(main, build_parser().parse_args())
