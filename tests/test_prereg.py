"""The preregistration (docs/preregistration.json, zcausal/prereg.py): every experiment declares
its one primary test in full; the confirmatory slice of the bank is disjoint from every problem
the committed development runs used; a run is confirmatory only with the current hash, a declared
model, the declared flags and enough pairs, and every committed example reads as exploratory."""
import copy
import gzip
import hashlib
import json
import re
from pathlib import Path

import pytest

from zcausal import bank, labels, prereg, problems
from zcausal.summaries import exp_d

import report

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "results").glob("example-*"))
FIELDS = ["script", "hypothesis", "statistic", "null", "tail", "alpha", "test", "depth", "k",
          "min_pairs", "pairs", "run", "labels", "power"]


def test_every_experiment_declares_one_primary_test_in_full():
    data = prereg.load()
    assert sorted(data["experiments"]) == list(prereg.EXPERIMENTS)
    for letter, declared in data["experiments"].items():
        missing = [f for f in FIELDS if f not in declared]
        assert not missing, f"{letter} declares no {missing}"
        assert declared["tail"] in labels.TAILS and 0 < declared["alpha"] <= 0.05
        assert {"reject", "null"} <= set(declared["labels"]), letter
        assert (REPO / declared["script"]).is_file(), letter
        assert declared["run"]["bank_offset"] == data["problems"]["offset"], letter
        assert set(declared["min_pairs"]) == set(data["models"]), letter
        for test in declared.get("secondary", []):
            assert {"test", "hypothesis", "null", "tail", "alpha"} <= set(test), letter
    # A and E keep enough pairs for 0 changes to bound a rate below 0.05 on the 0.5B
    for letter in ("A", "E"):
        least = data["experiments"][letter]["min_pairs"]["qwen2.5-coder-0.5b-instruct"]
        assert labels.upper_bound(0, least) < 0.05


def test_the_hash_is_the_files_bytes_and_a_run_records_it():
    digest = hashlib.sha256(prereg.PATH.read_bytes()).hexdigest()
    assert prereg.sha256() == digest
    record = prereg.record("A")
    assert record["path"] == "docs/preregistration.json" and record["sha256"] == digest
    assert record["declared_test"] == "z changes answers"
    assert record["declared_secondary"] == ["z vs en dlang_ref"]
    with pytest.raises(ValueError, match="no declaration for experiment 'F'"):
        prereg.declaration("F")


def _is_confirmatory(run):
    """Whether a run (report.find_runs' dict: config, script) reads as confirmatory
    (prereg.reading): its problems are the declared slice's by design, not development's."""
    return prereg.reading(run["config"], report.EXPERIMENTS[run["script"]][0])["confirmatory"]


def _development_runs():
    """Every committed run folder that is not confirmatory."""
    return [run["path"] for run in report.find_runs(REPO / "results", examples=True)
            if not _is_confirmatory(run)]


def _development_ids():
    """Every bank id the committed development runs name in any file (CSV, gzipped CSV, markdown,
    JSON), and the ids their flags cover (--bank-offset, --limit). Confirmatory runs are left out:
    an exploratory run on the slice (one that missed a declared flag or count) is counted."""
    found = set()
    runs = _development_runs()
    for path in (p for run in runs for p in run.rglob("*") if p.is_file()):
        if path.suffix in (".png", ".npz", ".pt", ".npy"):
            continue
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        found |= set(re.findall(r"bank[12]-\d{4}", raw.decode("utf-8", errors="ignore")))
    for config_path in (run / "config.json" for run in runs):
        args = json.loads(config_path.read_text(encoding="utf-8")).get("args", {})
        if args.get("prompts") == problems.BANK and args.get("limit"):
            offset, steps = args.get("bank_offset") or 0, args.get("bank_steps") or 1
            found |= {f"bank{steps}-{i:04d}" for i in range(offset, offset + args["limit"])}
    return found


def test_the_confirmatory_slice_was_never_used_in_development():
    assert EXAMPLES, "no committed development runs to check against"
    used = _development_ids()
    assert "bank1-0000" in used and "bank1-0149" in used  # the scan finds the runs' problems
    declared = prereg.load()["problems"]
    pairs = prereg.confirmatory_slice()
    ids = {p["id"] for p in pairs}
    assert len(ids) == len(pairs) == declared["size"]
    assert not ids & used
    assert min(ids) == f"bank1-{declared['offset']:04d}"
    # nor any text of the problems the development runs used (the bank's, prompts.json's)
    development = {p["en"] for p in bank.generate_bank(1) if p["id"] in used}
    development |= {p["en"] for p in problems.load_prompts()["pairs"]}
    assert not {p["en"] for p in pairs} & development
    # the slice is the bank's, seeded: the same problems on every machine
    assert pairs == bank.generate_bank(declared["steps"], seed=declared["seed"])[
        declared["offset"]:declared["offset"] + declared["size"]]


def _confirmatory_config(letter="A", model="qwen2.5-coder-0.5b-instruct", kept=80):
    declared = prereg.declaration(letter)
    args = dict(declared["run"], model=f"~/models/{model}", n_random=39)
    command = " ".join(prereg.command(letter, f"~/models/{model}", "results/run"))
    return {"args": args, "model": {"name_or_path": f"~/models/{model}"}, "command": command,
            "solved": {"kept": kept}, "n_pairs": kept,
            "preregistration": prereg.record(letter)}


@pytest.mark.parametrize("letter", prereg.EXPERIMENTS)
def test_a_run_with_the_declared_flags_hash_and_pairs_is_confirmatory(letter):
    least = prereg.declaration(letter)["min_pairs"]["qwen2.5-coder-0.5b-instruct"]
    config = _confirmatory_config(letter, kept=least)
    assert prereg.reading(config, letter) == dict(confirmatory=True, reasons=[],
                                                 word="confirmatory")
    assert prereg.status_sentence(config, letter).startswith("Confirmatory run")
    assert prereg.mark("null", prereg.reading(config, letter)) == "null"


@pytest.mark.parametrize("letter", prereg.EXPERIMENTS)
def test_the_declared_command_parses_into_flags_that_read_as_confirmatory(letter, tmp_path):
    """prereg.command (what tools/confirmatory.py runs): the script's own parser turns it into
    args whose config.json would read as confirmatory (with the pairs kept and the hash)."""
    import importlib
    argv = prereg.command(letter, "/models/qwen2.5-coder-0.5b-instruct", tmp_path / "run")
    script = importlib.import_module(Path(argv[0]).stem)
    args = vars(script.parse_args(argv[1:]))
    least = prereg.declaration(letter)["min_pairs"]["qwen2.5-coder-0.5b-instruct"]
    config = dict(_confirmatory_config(letter, kept=least), args=args)
    assert prereg.reading(config, letter)["reasons"] == []
    assert str(args["out"]) == str(tmp_path / "run")


@pytest.mark.parametrize("change, reason", [
    (lambda c: c.pop("preregistration"), "carries no preregistration hash"),
    (lambda c: c["preregistration"].update(sha256="0" * 64), "another version"),
    (lambda c: c["solved"].update(kept=74), "kept 74 pairs, declared at least 75"),
    (lambda c: c["args"].update(bank_offset=0), "--bank-offset is 0, declared 900"),
    (lambda c: c["args"].update(site="output"), "--site is 'output', declared 'input'"),
    (lambda c: c["args"].update(k=[20]), "--k is [20], declared 50"),
    (lambda c: c["args"].update(n_random=19), "--n-random is 19, declared at least 39"),
    (lambda c: c["args"].pop("bank_offset"), "does not record --bank-offset"),
    (lambda c: c["model"].update(name_or_path="Qwen/Qwen2.5-3B"), "not a declared model"),
    # a flag the declaration leaves at its default, given on the command line (even at the
    # default's value: the command shows it was chosen)
    (lambda c: c.update(command=c["command"] + " --seed 0"), "--seed was given"),
    (lambda c: c.update(command=c["command"] + " --max-new-tokens=4"), "--max-new-tokens was"),
    (lambda c: c.update(command=None), "records no command line"),
])
def test_anything_but_the_declared_run_is_exploratory(change, reason):
    config = copy.deepcopy(_confirmatory_config())
    change(config)
    r = prereg.reading(config, "A")
    assert not r["confirmatory"] and r["word"] == "exploratory"
    assert any(reason in why for why in r["reasons"]), r["reasons"]
    sentence = prereg.status_sentence(config, "A")
    assert sentence.startswith("Exploratory run") and "whatever its p" in sentence
    assert prereg.mark("null", r) == "null (exploratory)"


def test_the_open_flags_leave_a_run_confirmatory_and_an_undeclared_one_does_not():
    """C run with --steps 4 (what a timing probe does) is not the declared C, whatever else it
    matches; where and how it runs (--batch-size, --device, --dtype, --resume) is left open."""
    config = _confirmatory_config("C", kept=150)
    open_ = config["command"] + " --batch-size 8 --device cpu --dtype bfloat16 --resume"
    assert prereg.reading(dict(config, command=open_), "C")["confirmatory"]
    probe = dict(config, command=config["command"] + " --steps 4 --min-steps 4 --log-every 1")
    assert prereg.reading(probe, "C")["reasons"] == [
        "--steps was given, which the declaration leaves at its default",
        "--min-steps was given, which the declaration leaves at its default"]
    assert prereg.command_flags("exp_c.py --k 50 --drop-numbers --steps=4 -- x") == [
        "k", "drop_numbers", "steps"]


def _declared_folder(run):
    """Whether a run (report.find_runs' dict) lies under a confirmatory/ folder, where
    tools/confirmatory.py's declared runs are committed."""
    return "confirmatory" in Path(run["path"]).parts


def test_every_committed_example_reads_as_what_its_folder_says_in_its_summary_and_the_report():
    """Runs under a confirmatory/ folder are the declared runs and read confirmatory (their
    verdict unmarked); every other committed example is a development run and reads exploratory,
    for the reason its age gives."""
    runs_found = report.find_runs(REPO / "results", examples=True)
    assert runs_found
    for run in runs_found:
        letter = report.EXPERIMENTS[run["script"]][0]
        r = prereg.reading(run["config"], letter)
        if _declared_folder(run):
            assert r == dict(confirmatory=True, reasons=[], word="confirmatory"), run["path"]
            assert not report.headline(run)["verdict"].endswith("(exploratory)"), run["path"]
            continue
        assert r["reasons"], run["path"]  # every other committed example is a development run
        if "preregistration" not in run["config"]:  # made before the declaration existed
            assert r["reasons"] == ["its config.json carries no preregistration hash"], run["path"]
        else:  # made after it, on development problems with development flags
            assert any("--bank-offset" in reason for reason in r["reasons"]), run["path"]
    d_runs = [r for r in runs_found if r["script"] == "exp_d_bridge.py"]
    development = next(r for r in d_runs if not _declared_folder(r))
    assert exp_d.summary_lines(development["path"])[0].startswith(
        "Exploratory run: its config.json carries no preregistration hash")
    assert report.headline(development)["verdict"].endswith(" (exploratory)")
    for declared in (r for r in d_runs if _declared_folder(r)):
        assert exp_d.summary_lines(declared["path"])[0].startswith("Confirmatory run")


def test_confirmatory_tool_prints_every_declared_command_and_resumes_a_started_folder(
        tmp_path, capsys):
    """tools/confirmatory.py --dry-run: one declared command per experiment, each into its own
    folder under --out, --resume added where that folder holds a run; nothing written."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("confirmatory",
                                                  REPO / "tools" / "confirmatory.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    (tmp_path / "exp_b").mkdir()
    (tmp_path / "exp_b" / "config.json").write_text("{}", encoding="utf-8")
    args = tool.build_parser().parse_args(["--model", "M", "--out", str(tmp_path), "--dry-run",
                                           "--only", "A", "B"])
    assert tool.main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert " exp_a_patching.py --model M " in lines[0] and not lines[0].endswith("--resume")
    assert f"--out {tmp_path / 'exp_a'}" in lines[0]
    assert " exp_b_residual.py " in lines[1] and lines[1].endswith("--resume")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp_b"]  # nothing written
    with pytest.raises(SystemExit) as exit_info:
        tool.build_parser().parse_args(["--out", str(tmp_path)])  # --model is required
    assert exit_info.value.code == 2


def test_the_disjointness_scan_leaves_out_confirmatory_runs_only():
    """A run that reads confirmatory is the slice's by design; one that missed its declaration
    (too few pairs kept) is development use of whatever problems it names."""
    declared, short = ({"config": _confirmatory_config("A", kept=kept),
                        "script": "exp_a_patching.py"} for kept in (80, 10))
    assert _is_confirmatory(declared)
    assert not _is_confirmatory(short)
