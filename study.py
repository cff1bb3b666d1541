"""The whole study in one command: Experiments A-E at their defaults, one after another, then the
report of their folder.

    python study.py --model Qwen/Qwen2.5-3B --prompts-en mgsm_en.tsv --prompts-zh mgsm_zh.tsv \
        --out results/qwen2.5-3b                                       # on a GPU: the study
    python study.py --model tiny-random                                # every script's --smoke: seconds on a CPU
    python study.py --model Qwen/Qwen2.5-72B --device-map auto \
        --prompts-en mgsm_en.tsv --prompts-zh mgsm_zh.tsv             # larger than one GPU: docs/performance.md

Each experiment is its own script's parse_args and main, run in this process, into <out>/exp_a ...
<out>/exp_e, with the study's --model, --seed, --device, --dtype and --device-map; B and D also get
MGSM (--prompts-en/--prompts-zh; A, C and E use their own problems). A folder that already holds a
run (its config.json) is continued with --resume, so a study cut short continues where it stopped
when the same command is run again (a run that had finished is rechecked and summarised again);
with --overwrite it is replaced instead. On --model tiny-random every script gets --smoke (its preset of
seconds). Before anything runs, every experiment's flags, folder and problems are checked (an --out
holding other files, or a D whose pairs are too few for its k, is refused), and the study prints
what it will run with an estimated time per experiment from the cost model bench.py measures
(zcausal/cost.py: fixed + rate x the experiment's work, from a bench row of that part on the same
kind of device with a model of similar size, or "not estimated" and the bench command that gives
one); then one line as each experiment starts and ends, with its estimate beside the time it took.
At the end it writes the report of --out (report.py --results OUT: <out>/report/REPORT.md) and
prints its table.
"""
import importlib
import time
from pathlib import Path

import common
import report
from zcausal import cost, placement, problems, runs, stats

# what an interrupted study says to do (runs.run_cli)
CONTINUE = "the same command (the study resumes itself)"
# letter -> the experiment's script (module name), run in this order
EXPERIMENTS = {"A": "exp_a_patching", "B": "exp_b_residual", "C": "exp_c_ard_mmd",
               "D": "exp_d_bridge", "E": "exp_e_layer_sweep"}
MGSM_TAKERS = ("B", "D")  # the experiments that read --prompts-en/--prompts-zh (A, C, E: the bank)
REPORT_FOLDER = "report"  # <out>/report/REPORT.md


def check_study_out(out):
    """--out holds nothing but a study's folders (exp_a ... exp_e, report): a folder of other
    files is refused, --overwrite or not, before anything runs."""
    out = runs.check_out_arg(out)
    ours = {f"exp_{letter.lower()}" for letter in EXPERIMENTS} | {REPORT_FOLDER}
    other = sorted(p.name for p in out.iterdir() if p.name not in ours) if out.is_dir() else []
    if other:
        shown = ", ".join(other[:3]) + (f" and {len(other) - 3} more" if len(other) > 3 else "")
        raise runs.UsageError(f"--out {out} holds files that are not a study's ({shown}); pass a "
                              f"new --out")
    return out


def step_argv(args, letter, out):
    """The command line of one experiment: the study's model, seed, device, dtype and device map;
    MGSM for B and D; --resume where its folder holds a run (--overwrite instead with the study's
    --overwrite); --smoke on tiny-random."""
    has_run = (out / "config.json").is_file()
    argv = ["--model", args.model, "--out", str(out), "--seed", str(args.seed)]
    argv += ["--smoke"] if args.model == common.TINY_MODEL else []
    argv += (["--overwrite"] if args.overwrite else ["--resume"]) if has_run else []
    for flag, value in (("--device", args.device), ("--dtype", args.dtype),
                        ("--device-map", args.device_map)) + (
            (("--prompts-en", args.prompts_en), ("--prompts-zh", args.prompts_zh))
            if letter in MGSM_TAKERS else ()):
        argv += [flag, str(value)] if value is not None else []
    return argv


def check_bridge_size(step):
    """D's primary test fits k-dimensional maps on N problems: with N <= k + 1 least squares
    interpolates (in-sample R^2 = 1 by construction), so the study refuses it up front."""
    k = stats.primary_k(step["args"].k)
    if step["pairs"] <= k + 1:
        raise runs.UsageError(f"D (exp_d_bridge.py) would fit k = {k} on {step['pairs']} pairs, "
                              f"where N <= k + 1 makes its maps exact by construction; pass "
                              f"--prompts-en mgsm_en.tsv --prompts-zh mgsm_zh.tsv (MGSM's 250 "
                              f"pairs)")


def plan(args):
    """One step per experiment: dict(letter, module, out, argv, args, resume, pairs). Parsing
    every script's flags, checking its shared flags and folder (runs.validate_common) and reading
    its problems here makes bad input fail before anything runs."""
    check_study_out(args.out)
    steps = []
    for letter, name in EXPERIMENTS.items():
        module = importlib.import_module(name)
        out = Path(args.out) / f"exp_{letter.lower()}"
        argv = step_argv(args, letter, out)
        script_args = module.parse_args(argv)
        try:
            runs.validate_common(script_args, script=f"{name}.py")
            pairs = problems.load_pairs(script_args, bank_limit=getattr(module, "BANK_PAIRS", None))
        except runs.UsageError as err:
            raise runs.UsageError(f"{letter} ({name}.py): {err}") from None
        steps.append(dict(letter=letter, module=module, out=out, argv=argv, args=script_args,
                          resume=script_args.resume, pairs=len(pairs)))
        if letter == "D":
            check_bridge_size(steps[-1])
    return steps


def estimates(steps, args):
    """Per step (seconds or None, what the estimate rests on), from the cost model
    (zcausal/cost.py) and the bench rows there are; and the resolved device."""
    device = common.check_runtime(args.device, args.dtype, args.device_map)
    dtype = common.resolve_dtype(args.dtype, device)
    config = common.load_model_config(args.model)
    parameters, tflops = cost.parameter_count(config), cost.matmul_tflops(device, dtype)
    rows = cost.cost_rows()
    return [cost.estimate(step["letter"].lower(), rows,
                          step["module"].work(step["args"], step["pairs"], config), step["pairs"],
                          parameters, tflops, device) for step in steps], device


def _duration(seconds):
    if seconds is None:
        return "not estimated"
    if seconds < 90:
        return f"{seconds:.2g} s" if seconds < 10 else f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def print_plan(steps, guesses, args, device):
    where = f"{device} (--device-map {args.device_map})" if args.device_map else device
    print(f"[study] {args.model} on {where} into {args.out}: "
          f"{len(steps)} experiments, each at its defaults"
          + (" (--smoke presets)" if args.model == common.TINY_MODEL else ""), flush=True)
    width = max(len(str(step["out"])) for step in steps)
    for step, (seconds, basis) in zip(steps, guesses):
        print(f"  {step['letter']}  {step['module'].__name__ + '.py':21} "
              f"{str(step['out']):{width}}  "
              f"{'continue (--resume)' if step['resume'] else 'new':19}  {step['pairs']:4} pairs  "
              f"{('~' if seconds is not None else '') + _duration(seconds):>13}  ({basis})",
              flush=True)
    known = [seconds for seconds, _ in guesses if seconds is not None]
    print(f"[study] estimated total: {'at least ' if len(known) < len(guesses) else 'about '}"
          f"{_duration(sum(known))} (zcausal/cost.py, from bench.py's rows; the models' loading "
          f"not included)", flush=True)


def run_step(step, i, n, guess=None):
    """The experiment's main() on its parsed flags; its seconds (printed beside `guess`, the
    estimate in seconds)."""
    command = " ".join([f"{step['module'].__name__}.py"] + step["argv"])
    print(f"[study {i}/{n}] {step['letter']}: python {command}", flush=True)
    started = time.perf_counter()
    try:
        step["module"].main(step["args"])
    except runs.UsageError as err:
        raise runs.UsageError(f"{step['letter']} ({step['module'].__name__}.py): {err}") from None
    seconds = time.perf_counter() - started
    print(f"[study {i}/{n}] {step['letter']} finished in {_duration(seconds)}"
          + (f" (estimated {_duration(guess)})" if guess is not None else ""), flush=True)
    return seconds


def print_report(out):
    """Write <out>/report/REPORT.md and print its scan table."""
    path = Path(out) / REPORT_FOLDER / "REPORT.md"
    text = report.build_report(out, path, runs.DEFAULT_FIGURES)
    table = text.split("## At a glance", 1)[-1].split("\n\n")[1] if "## At a glance" in text else ""
    print(f"[study] report: {path}\n{table}", flush=True)
    return path


def main(args):
    runs.check_counts(args)
    steps = plan(args)
    guesses, device = estimates(steps, args)
    print_plan(steps, guesses, args, device)
    started = time.perf_counter()
    for i, (step, (guess, _)) in enumerate(zip(steps, guesses), 1):
        run_step(step, i, len(steps), guess)
    print(f"[study] all {len(steps)} experiments in {_duration(time.perf_counter() - started)}",
          flush=True)
    return print_report(args.out)


def parse_args(argv=None):
    parser = runs.make_parser(__doc__)
    parser.add_argument("--model", default=common.DEFAULT_MODEL,
                        help=f"hub id, local folder, or {common.TINY_MODEL} (every script's "
                             f"--smoke preset)")
    parser.add_argument("--out", type=Path, default=None,
                        help="the study's folder, one subfolder per experiment (default: "
                             "results/<the model's name, lower case>)")
    parser.add_argument("--prompts-en", type=Path, default=None,
                        help="MGSM's English TSV (mgsm_en.tsv), with --prompts-zh: the problems of "
                             "B and D (A, C and E use their own defaults)")
    parser.add_argument("--prompts-zh", type=Path, default=None,
                        help="MGSM's Chinese TSV (mgsm_zh.tsv), row i the same problem as "
                             "--prompts-en's")
    parser.add_argument("--seed", type=int, default=0, help="every experiment's --seed")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the experiments' runs in --out instead of continuing them")
    parser.add_argument("--device", default=None, help="cpu or cuda; None: cuda if available")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="None: bfloat16 on CUDA, float32 on CPU")
    placement.add_device_map_arg(parser)
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = Path("results") / Path(args.model).name.lower()
    return args


if __name__ == "__main__":
    runs.run_cli(main, parse_args(), CONTINUE)
