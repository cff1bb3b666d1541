"""The whole study in one command: Experiments A-E at their defaults, one after another, then the
report of their folder.

    python study.py --model Qwen/Qwen2.5-3B --out results/qwen2.5-3b   # on a GPU: the study
    python study.py --model tiny-random                                # every script's --smoke: seconds on a CPU
    python study.py --model Qwen/Qwen2.5-72B --device-map auto         # larger than one GPU: docs/performance.md

Each experiment is its own script's parse_args and main, run in this process, into <out>/exp_a ...
<out>/exp_e. A folder that already holds a run (its config.json) is continued with --resume, so a
study cut short continues where it stopped when the same command is run again; a run that had
finished is rechecked and summarised again. On --model tiny-random every script that has --smoke
gets it (its preset of seconds). Before anything runs the study prints what it will run, with an
estimated time per experiment from bench.py's cost model (bench.estimate: a bench.py row of that
part measured on the same kind of device with a model of similar size, scaled by pairs, parameters
and the device's matmul rate, or "not estimated" and the bench command that gives one; for E
without such a row, the compute limit of its FLOP count, bench.sweep_flops); then one line as each
experiment starts and ends. At the end it writes the report of --out (report.py --results OUT:
<out>/report/REPORT.md) and prints its table.
"""
import importlib
import time
from pathlib import Path

import common
import bench
import report
from zcausal import placement, problems, runs

# what an interrupted study says to do (runs.run_cli)
CONTINUE = "the same command (the study resumes itself)"
# letter -> the experiment's script (module name), run in this order
EXPERIMENTS = {"A": "exp_a_patching", "B": "exp_b_residual", "C": "exp_c_ard_mmd",
               "D": "exp_d_bridge", "E": "exp_e_layer_sweep"}


def plan(args):
    """One step per experiment: dict(letter, module, out, argv, args, resume, pairs). Parsing
    every script's flags and reading its problems here makes bad input fail before anything runs."""
    steps = []
    for letter, name in EXPERIMENTS.items():
        module = importlib.import_module(name)
        out = Path(args.out) / f"exp_{letter.lower()}"
        resume = (out / "config.json").is_file()
        argv = ["--model", args.model, "--out", str(out)] + (["--resume"] if resume else [])
        for flag, value in (("--device", args.device), ("--dtype", args.dtype),
                            ("--device-map", args.device_map)):
            argv += [flag, value] if value is not None else []
        if args.model == common.TINY_MODEL:
            argv, _ = bench.accepted(module.parse_args, argv, [["--smoke"]])
        script_args = module.parse_args(argv)
        steps.append(dict(letter=letter, module=module, out=out, argv=argv, args=script_args,
                          resume=resume, pairs=len(problems.load_pairs(
                              script_args, bank_limit=getattr(module, "BANK_PAIRS", None)))))
    return steps


def estimates(steps, args):
    """Per step (seconds or None, what the estimate rests on), from bench.py's cost model; and
    the resolved device."""
    device = common.check_runtime(args.device, args.dtype, args.device_map)
    dtype = common.resolve_dtype(args.dtype, device)
    config = common.load_model_config(args.model)
    parameters, tflops = bench.parameter_count(config), bench.matmul_tflops(device, dtype)
    rows = bench.cost_rows()
    out = []
    for step in steps:
        seconds, basis = bench.estimate(step["letter"].lower(), rows, parameters, step["pairs"],
                                        tflops, device)
        if seconds is None and step["letter"] == "E":
            a = step["args"]
            prompt = bench.SHAPES["qwen2.5-3b"]["step_prompt"]
            flops = bench.sweep_flops(config, step["pairs"], len(step["module"].FIXED) + a.n_random,
                                      a.last_m, prompt)
            seconds, basis = flops / (tflops * 1e12), (
                f"the compute limit: the sweep's {flops / 1e12:.3g} TFLOP (bench.sweep_flops, "
                f"{prompt}-token prompts) at this device's {tflops:.3g} TFLOP/s, which E's CPU "
                f"sweeps reach; a GPU reaches less of its rate; DAS left out")
        out.append((seconds, basis))
    return out, device


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
          f"{_duration(sum(known))} (scaled from bench.py's rows: an order of magnitude)",
          flush=True)


def run_step(step, i, n):
    """The experiment's main() on its parsed flags; its seconds."""
    command = " ".join([f"{step['module'].__name__}.py"] + step["argv"])
    print(f"[study {i}/{n}] {step['letter']}: python {command}", flush=True)
    started = time.perf_counter()
    try:
        step["module"].main(step["args"])
    except runs.UsageError as err:
        raise runs.UsageError(f"{step['letter']} ({step['module'].__name__}.py): {err}") from None
    seconds = time.perf_counter() - started
    print(f"[study {i}/{n}] {step['letter']} finished in {_duration(seconds)}", flush=True)
    return seconds


def print_report(out):
    """Write <out>/report/REPORT.md and print its scan table."""
    path = Path(out) / "report" / "REPORT.md"
    text = report.build_report(out, path, runs.DEFAULT_FIGURES)
    table = text.split("## At a glance", 1)[-1].split("\n\n")[1] if "## At a glance" in text else ""
    print(f"[study] report: {path}\n{table}", flush=True)
    return path


def main(args):
    runs.check_out_arg(args.out)
    steps = plan(args)
    guesses, device = estimates(steps, args)
    print_plan(steps, guesses, args, device)
    started = time.perf_counter()
    for i, step in enumerate(steps, 1):
        run_step(step, i, len(steps))
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
