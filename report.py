"""A report of the runs under a results folder, rebuilt from their CSVs without a model.

    python report.py                           # your runs under results/ -> results/report/REPORT.md
    python report.py --results results/qwen2.5-3b   # one study -> results/qwen2.5-3b/report/REPORT.md
    python report.py --examples                # the committed report: results/example-*/ ->
                                               #   results/REPORT.md, figures/report_sweep_by_depth.png

A run is any folder with a config.json whose command is one of the experiment scripts. The report
opens with one table, a row per run: its experiment, model, verdict and the one number behind the
verdict with its interval (each experiment's headline); then one figure that puts every model's
layer sweep (Experiment E) on a shared depth axis; then a section per model and run, led by the
run's figures and a few short sentences, with the experiment's full generated paragraph (the
sentences it prints at the end of its run), its command and its config.json below.

User runs never modify a tracked file: without --examples the report and its sweep figure go to
results/report/ (git-ignored), and the committed worked examples (the folders example-* directly
under --results) are left out. Nothing in a report depends on the time it was built: rebuilding
gives identical bytes.
"""
import json
import os
from pathlib import Path

from zcausal.summaries import exp_a, exp_b, exp_c, exp_d, exp_e
from zcausal import prereg, runs
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
EXAMPLES = "example-*"  # the committed worked examples, first-level folders of results/
# The committed report (--examples): its runs, its file and its figure root.
COMMITTED = dict(results=runs.REPO / "results", out=runs.REPO / "results" / "REPORT.md",
                 figures=runs.REPO / "figures")
# what reading a run folder that is still being written (or was interrupted) raises
UNFINISHED = (UsageError, FileNotFoundError, KeyError, IndexError, ValueError)


def find_runs(results, examples=False):
    """Every run folder under `results` (sorted): dicts with path, script, model, config. The
    first-level folders named example-* are the committed worked examples: `examples` True keeps
    only them, False leaves them out."""
    found = []
    for config_path in sorted(Path(results).rglob("config.json")):
        top = config_path.relative_to(results).parts[0]
        if Path(top).match(EXAMPLES) != examples:
            continue
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
    return sorted(found, key=lambda r: (r["model"], EXPERIMENTS[r["script"]][0], r["path"].name,
                                        str(r["path"])))


def _rel(path, start):
    return Path(os.path.relpath(Path(path).resolve(), Path(start).resolve())).as_posix()


def _cell(text):
    return " ".join(str(text).split()).replace("|", "\\|")


NOT_FINISHED = dict(verdict="not finished", value="not measured (the run has not finished)",
                    lead=[])


def headline(run):
    """The run's headline dict, its verdict marked '(exploratory)' unless the run is a
    confirmatory one (zcausal/prereg.py), or NOT_FINISHED."""
    letter, _, module = EXPERIMENTS[run["script"]]
    try:
        cell = module.headline(run["path"])
    except UNFINISHED:
        return NOT_FINISHED
    return dict(cell, verdict=prereg.mark(cell["verdict"], prereg.reading(run["config"], letter)))


def _layer(config):
    """'L of N' of a run's patched or basis layer."""
    layer = (config.get("layers_resolved", {}).get("layer") or config.get("basis_layer")
             or config.get("layer") or config.get("args", {}).get("layer"))
    layer = layer[0] if isinstance(layer, list) else layer
    n = config.get("model", {}).get("num_layers") or config.get("n_layers")
    return f"{layer} of {n}"


def scan_table(found, results, cells):
    """One row per run: experiment, run folder, model, layer, verdict and the number behind it
    (`cells`: each run's headline, by its path)."""
    lines = ["| experiment | run | model | layer | verdict | the number behind it |",
             "|---|---|---|---|---|---|"]
    for run in sorted(found, key=lambda r: (EXPERIMENTS[r["script"]][0], r["path"].name,
                                            r["model"])):
        cell = cells[run["path"]]
        letter = EXPERIMENTS[run["script"]][0]
        lines.append(f"| {letter} | `{_rel(run['path'], results)}` | {run['model']} | "
                     f"{_layer(run['config'])} | **{_cell(cell['verdict'])}** | "
                     f"{_cell(cell['value'])} |")
    return lines


def _paragraph(module, path):
    """The experiment's full generated paragraph of the run, or None while it cannot be read."""
    try:
        return " ".join(module.summary_lines(path))
    except UNFINISHED:
        return None


def run_section(run, results, report_dir, figures, cell):
    """Markdown lines for one run: figures, lead sentences (`cell`: its headline), the full
    paragraph, command, config."""
    letter, title, module = EXPERIMENTS[run["script"]]
    path, config = run["path"], run["config"]
    lines = [f"### {letter}: {title} (`{_rel(path, results)}`)", ""]
    folder = runs.figure_dir(path, figures)
    pngs = [f"![{letter} {png.stem}]({_rel(png, report_dir)})"
            for png in sorted(folder.glob("*.png"))]
    lines += pngs + ([""] if pngs else [])
    paragraph = _paragraph(module, path) if cell is not NOT_FINISHED else None
    if paragraph is None:
        lines += ["No results: the run has not finished (its folder holds too little to "
                  "summarise; rerun the command below with --resume).", ""]
    else:
        lines += [f"**{cell['verdict']}**: {cell['value']}.", ""] + \
            [f"- {sentence}" for sentence in cell["lead"]] + ["", "Full summary: " + paragraph, ""]
    command = (["```", f"python {config['command']}", "```"] if config.get("command") else
               ["(started from Python, not as a command: the flags are config.json's args)"])
    config_link = _rel(path / "config.json", report_dir)
    lines += command + ["", f"Configuration: [{config_link}]({config_link}); model "
                        f"{config.get('model', {}).get('dtype', '?')} on "
                        f"{config.get('model', {}).get('device_name', '?')}.", ""]
    return lines


def plot_sweeps(found, path):
    """top1_src (swap source: the share of pairs whose patched argmax is the source's first digit)
    against fraction of depth, full interchange and Z of the basis layer with the random band, one
    colour per model. Returns the path, or None without runs."""
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
            ax.plot(part.depth, part.top1_src, style, color=colour, marker=".",
                    label=f"{label}: {'full' if condition == 'full' else 'Z'}")
        rand = swap[swap.condition == "random"].sort_values("depth")
        ax.fill_between(rand.depth, rand.top1_src_lo, rand.top1_src_hi, color=colour, alpha=0.15,
                        label=f"{label}: random band")
        basis = run["config"].get("basis_layer")
        if basis is not None:
            ax.axvline(basis / run["config"]["model"]["num_layers"], color=colour, lw=0.8, ls=":")
    ax.axhline(0, color="0.5", lw=0.5)
    ax.set_xlabel("fraction of depth (layer / number of layers); dotted: Z's basis layer")
    ax.set_ylabel("share of pairs: argmax = source's first digit")
    ax.set_title("Layer sweep, last position, swap source: every model on one depth axis")
    ax.set_ylim(-0.03, 1.03)
    ax.legend(fontsize=7, loc="center left")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return runs.save_figure(fig, path)


def build_report(results, out, figures, sweep_figure=None, examples=False):
    """The report's text, written to `out`; the sweep figure to `sweep_figure` (default: beside
    `out`). `figures`: the root the runs' --figures named (runs.figure_dir finds their PNGs)."""
    results, out = Path(results), Path(out)
    sweep_figure = Path(sweep_figure) if sweep_figure else out.parent / SWEEP_FIGURE
    found = find_runs(results, examples)
    cells = {run["path"]: headline(run) for run in found}  # each read once: A's takes a second
    what = "the committed worked examples" if examples else "every run"
    lines = [f"# Report: {what} under `{runs.portable(results)}`", "",
             "Generated by `python report.py" + (" --examples" if examples else "") + "` from the "
             "CSVs and config.json of each run (no model); rebuilding gives the same bytes. Each "
             "section opens with the run's figures and its headline; the experiment's full "
             "summary of its numbers follows.", ""]
    missing = [f"{letter} ({title})" for script, (letter, title, _) in EXPERIMENTS.items()
               if not any(r["script"] == script for r in found)]
    if missing:
        lines += [f"No results under `{runs.portable(results)}` for: " + ", ".join(missing)
                  + ". Run the experiment's script with an --out below this folder"
                  + ("" if examples else " (the committed worked examples: "
                     "`python report.py --examples`)") + ".", ""]
    if found:
        lines += ["## At a glance", ""] + scan_table(found, results, cells) + [""]
        figure = plot_sweeps(found, sweep_figure)
        if figure:
            lines += [f"![layer sweeps by depth]({_rel(figure, out.parent)})", ""]
    for model in sorted({r["model"] for r in found}):
        lines += [f"## {model}", ""]
        for run in (r for r in found if r["model"] == model):
            lines += run_section(run, results, out.parent, figures, cells[run["path"]])
    text = "\n".join(lines).rstrip() + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    return text


def resolve(args):
    """(results, out, figures, sweep figure) of the command: --examples names the committed paths
    and takes no --results / --out; otherwise --out defaults to <results>/report/REPORT.md."""
    if args.examples:
        given = [flag for flag, value in (("--results", args.results), ("--out", args.out))
                 if value is not None]
        if given:
            raise UsageError(f"--examples builds the committed report (results/example-*/ -> "
                             f"results/REPORT.md); drop {' and '.join(given)}")
        return (COMMITTED["results"], COMMITTED["out"], COMMITTED["figures"],
                COMMITTED["figures"] / SWEEP_FIGURE)
    results = Path(args.results or "results")
    if not results.is_dir():
        raise UsageError(f"--results {results}: no such folder; pass the folder that holds the "
                         f"runs (default results/)")
    out = Path(args.out) if args.out else results / "report" / "REPORT.md"
    if out.resolve() == COMMITTED["out"]:
        raise UsageError(f"--out {out} is the committed report; build it with --examples")
    return results, out, args.figures, None


def main(args):
    results, out, figures, sweep = resolve(args)
    text = build_report(results, out, figures, sweep, examples=args.examples)
    print(f"wrote {out} ({len(text.splitlines())} lines)")
    return out


def build_parser():
    parser = runs.make_parser(__doc__)
    parser.add_argument("--results", type=Path, default=None,
                        help="folder searched (recursively) for runs (default: results/)")
    parser.add_argument("--out", type=Path, default=None,
                        help="the report file (default: <results>/report/REPORT.md, its sweep "
                             "figure beside it)")
    parser.add_argument("--figures", type=Path, default=runs.DEFAULT_FIGURES,
                        help="figures root the runs wrote to (their --figures)")
    parser.add_argument("--examples", action="store_true",
                        help="build the committed report from the committed runs results/"
                             "example-*/ into results/REPORT.md and figures/"
                             f"{SWEEP_FIGURE}")
    return parser


if __name__ == "__main__":
    runs.run_cli(main, build_parser().parse_args())
