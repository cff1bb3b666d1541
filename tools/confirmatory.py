"""Run the preregistered confirmatory study on one model: each experiment's declared command
(docs/preregistration.json, built by zcausal.prereg.command), one after the other, each in its
own folder under --out, then the report of those folders.

    python tools/confirmatory.py --model Qwen/Qwen2.5-3B --out results/confirmatory-3b
    python tools/confirmatory.py --model PATH --only B D --dry-run   # print the commands

A folder that already holds a run is continued (--resume), never overwritten; an experiment that
fails stops nothing else. The runs read as confirmatory only while docs/preregistration.json
keeps the hash they record, on a declared model, with at least the declared pairs kept.
"""
import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from zcausal import prereg  # noqa: E402


def commands(model, out, only, extra):
    """(experiment, argv) of each declared run in `only` under out/exp_<letter>."""
    return [(e, [sys.executable] + prereg.command(e, model, Path(out) / f"exp_{e.lower()}")
             + list(extra)) for e in only]


def main(args):
    failed = []
    for experiment, argv in commands(args.model, args.out, args.only, args.extra):
        if (Path(argv[argv.index("--out") + 1]) / "config.json").is_file():
            argv.append("--resume")
        print(" ".join(argv), flush=True)
        if not args.dry_run and subprocess.run(argv, cwd=prereg.REPO).returncode != 0:
            failed.append(experiment)
    if not args.dry_run:
        subprocess.run([sys.executable, "report.py", "--results", str(args.out)], cwd=prereg.REPO)
    if failed:
        print(f"failed: {', '.join(failed)} (rerun this command to continue them)")
    return 1 if failed else 0


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", required=True, help="hub id or local folder of a declared "
                                                       "model (docs/preregistration.json)")
    parser.add_argument("--out", required=True, help="folder of the runs (exp_a ... exp_e)")
    parser.add_argument("--only", nargs="+", choices=prereg.EXPERIMENTS,
                        default=list(prereg.EXPERIMENTS), help="experiments to run")
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    parser.add_argument("extra", nargs=argparse.REMAINDER,
                        help="after --: flags for every script that the declaration leaves "
                             "open (prereg.OPEN_FLAGS: --batch-size, --device, --dtype, "
                             "--figures, ...); any other makes the runs exploratory")
    return parser


if __name__ == "__main__":
    parsed = build_parser().parse_args()
    parsed.extra = [a for a in parsed.extra if a != "--"]
    sys.exit(main(parsed))
