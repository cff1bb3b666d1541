"""The preregistration (docs/preregistration.json): its declarations, the hash each run records,
and whether a finished run is read as confirmatory or exploratory.

    record = prereg.record("A")               # config.json's "preregistration": path, sha256, ...
    reading = prereg.reading(config, "A")     # dict(confirmatory, reasons, word)
    prereg.status_sentence(config, "A")       # the sentence a summary opens with
    pairs = prereg.confirmatory_slice()       # the problems never used in development
    prereg.command("A", model, out)           # the declared run as an argv (tools/confirmatory.py)

A run is confirmatory only when its config.json carries the sha256 of the preregistration as it
stands now (so the declaration preceded the run and was not changed after it), its model is a
declared one, its flags are the declared ones (the problem slice, site, depth, k, ...), its command
line gave no flag beyond those and the open ones (OPEN_FLAGS: every other stays at its script's
default) and it kept at least the declared number of pairs. Anything else, every committed example
included, is exploratory, whatever its p; and in a confirmatory run, every test but the declared
ones is exploratory. Imports runs and bank only.
"""
import hashlib
import json
import math
import shlex
from pathlib import Path

from zcausal.runs import REPO, flag_name

PATH = REPO / "docs" / "preregistration.json"
EXPERIMENTS = ("A", "B", "C", "D", "E")
# Flags the declaration leaves open: where and how a run executes, not what it measures (the
# decode engines give the same tokens; the tests check it). Any other flag given on the command
# line beside the declared ones (--steps, --seed, --smoke, ...) makes a run exploratory, even at
# its default value: the declaration fixes every other flag at its script's default.
OPEN_FLAGS = ("model", "out", "figures", "batch_size", "device", "device_map", "dtype",
              "cache_dir", "resume", "overwrite", "decode", "log_every")


def load(path=PATH):
    """The preregistration as a dict (docs/preregistration.json)."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def sha256(path=PATH):
    """The sha256 of the preregistration file's bytes (hex)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def declaration(experiment, path=PATH):
    """One experiment's declaration (experiment: 'A'..'E'); ValueError for another name."""
    experiments = load(path)["experiments"]
    if experiment not in experiments:
        raise ValueError(f"no declaration for experiment {experiment!r}; the preregistration "
                         f"declares {', '.join(sorted(experiments))}")
    return experiments[experiment]


def record(experiment, path=PATH):
    """What a run writes into config.json as "preregistration" when it starts: the file (relative
    to the repository), its sha256, the experiment and its declared tests."""
    declared = declaration(experiment, path)
    try:
        shown = Path(path).resolve().relative_to(REPO).as_posix()
    except ValueError:
        shown = Path(path).name
    return {"path": shown, "sha256": sha256(path), "experiment": experiment,
            "declared_test": declared["test"],
            "declared_secondary": [t["test"] for t in declared.get("secondary", [])]}


def confirmatory_slice(path=PATH):
    """The pairs of the confirmatory slice (the preregistration's "problems": bank, steps, seed,
    offset, size), with the bank's own ids."""
    from zcausal.bank import bank_slice
    p = load(path)["problems"]
    return bank_slice(p["steps"], p["offset"], p["size"], seed=p["seed"])


def command(experiment, model, out, path=PATH):
    """The declared run of `experiment` as an argv list [script, flags...]: the declaration's
    `run` flags (a false switch or a null value left out), its `min_run` counts, --model and
    --out. Parsed by the script and recorded in config.json, these flags read as confirmatory
    (tests/test_prereg.py)."""
    declared = declaration(experiment, path)
    argv = [declared["script"], "--model", str(model)]
    for name, value in {**declared.get("run", {}), **declared.get("min_run", {})}.items():
        flag = flag_name(name)
        if value is None or value is False:
            continue
        argv += [flag] if value is True else [flag, *map(str, value if isinstance(value, list)
                                                           else [value])]
    return argv + ["--out", str(out)]


# ----------------------------------------------------------------------------------------------
# Reading a run

def model_name(config):
    """The model's folder or hub name in lower case ('qwen2.5-coder-0.5b-instruct')."""
    name = (config.get("model") or {}).get("name_or_path") or config.get("args", {}).get("model")
    return Path(str(name)).name.lower()


def kept_pairs(config):
    """The pairs a run measured: the kept pairs where it selected solved ones, else n_pairs."""
    solved = config.get("solved") or {}
    return solved.get("kept", config.get("n_pairs"))


def _matches(declared, actual):
    """A declared flag value against the run's: the value itself, or one of a list's values."""
    values = actual if isinstance(actual, list) else [actual]
    for value in values:
        if isinstance(declared, float) and isinstance(value, (int, float)):
            if math.isclose(value, declared, abs_tol=1e-9):
                return True
        elif value == declared:
            return True
    return False


def command_flags(command):
    """The flags given on a recorded command line ('exp_c_ard_mmd.py --steps 4 ...'), as argparse
    names in order: ['steps', ...]."""
    return [token[2:].split("=")[0].replace("-", "_") for token in shlex.split(command)
            if token.startswith("--") and len(token) > 2]


def _undeclared_reasons(declared, command):
    """Why a run's command line gave flags beyond the declared and the open ones: one reason per
    flag (a run started from Python records no command, and cannot show which it was given)."""
    if not command:
        return ["its config.json records no command line (run it as a command, as "
                "tools/confirmatory.py does, so that its flags can be read)"]
    fixed = set(declared.get("run", {})) | set(declared.get("min_run", {})) | set(OPEN_FLAGS)
    return [f"{flag_name(name)} was given, which the declaration leaves at its default"
            for name in dict.fromkeys(command_flags(command)) if name not in fixed]


def _flag_reasons(declared, args):
    """Why a run's flags (config.json's args) are not the declared ones: one reason per flag."""
    reasons = []
    for name, value in declared.get("run", {}).items():
        flag = flag_name(name)
        if name not in args:
            reasons.append(f"its config.json does not record {flag}")
        elif not _matches(value, args[name]):
            reasons.append(f"{flag} is {args[name]!r}, declared {value!r}")
    for name, least in declared.get("min_run", {}).items():
        if (args.get(name) or 0) < least:
            reasons.append(f"{flag_name(name)} is {args.get(name)!r}, declared at "
                           f"least {least}")
    return reasons


def reading(config, experiment, path=PATH):
    """Whether a run (its config.json dict) is read as confirmatory: dict(confirmatory (bool),
    reasons (why not; empty when confirmatory), word ('confirmatory' / 'exploratory'))."""
    recorded = config.get("preregistration") or {}
    if not recorded.get("sha256"):
        reasons = ["its config.json carries no preregistration hash"]
    else:
        reasons = []
        now = sha256(path)
        if recorded["sha256"] != now:
            reasons.append(f"it was declared under another version of the preregistration "
                           f"(sha256 {recorded['sha256'][:12]}, now {now[:12]})")
        declared = declaration(experiment, path)
        model = model_name(config)
        least = declared.get("min_pairs", {}).get(model)
        if least is None:
            reasons.append(f"its model {model} is not a declared model")
        elif (kept_pairs(config) or 0) < least:
            reasons.append(f"it kept {kept_pairs(config)} pairs, declared at least {least}")
        reasons += _flag_reasons(declared, config.get("args", {}))
        reasons += _undeclared_reasons(declared, config.get("command"))
    confirmatory = not reasons
    return dict(confirmatory=confirmatory, reasons=reasons,
                word="confirmatory" if confirmatory else "exploratory")


def status_sentence(config, experiment, path=PATH):
    """The sentence a summary opens with: confirmatory (which tests are declared; every other is
    exploratory) or exploratory (why; every test is, whatever its p)."""
    r = reading(config, experiment, path)
    if r["confirmatory"]:
        declared = declaration(experiment, path)
        tests = [declared["test"]] + [t["test"] for t in declared.get("secondary", [])]
        return (f"Confirmatory run (docs/preregistration.json, sha256 "
                f"{config['preregistration']['sha256'][:12]}): the declared tests are "
                + "; ".join(f"'{t}'" for t in tests)
                + "; every other test here is exploratory, whatever its p.")
    return ("Exploratory run: " + "; ".join(r["reasons"]) + ". Every test here, the primary "
            "included, is exploratory, whatever its p.")


def mark(verdict, reading_):
    """A verdict with ' (exploratory)' appended unless the run is confirmatory."""
    return verdict if reading_["confirmatory"] else f"{verdict} (exploratory)"
