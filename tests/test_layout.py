"""The repository's map: the top level holds what a user runs, the machinery lives in zcausal/, each
module stays one concern, imports go only downward, and the five scripts share one set of
conventions (--replot, --smoke, --k, --n-random 0, the default layer)."""
import ast
import re
from pathlib import Path

import pytest

import exp_a_patching
import exp_b_residual
import exp_c_ard_mmd
import exp_d_bridge
import exp_e_layer_sweep

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = {"A": exp_a_patching, "B": exp_b_residual, "C": exp_c_ard_mmd, "D": exp_d_bridge,
           "E": exp_e_layer_sweep}
TOP_LEVEL = {"README.md", "requirements.txt", "common.py", "exp_a_patching.py", "exp_b_residual.py",
             "exp_c_ard_mmd.py", "exp_d_bridge.py", "exp_e_layer_sweep.py", "report.py",
             "bench.py", "study.py", "prompts.json", "pytest.ini", "results", "figures", "tests",
             "tools", "docs", "zcausal"}
# Layers of the import graph, lowest first: a module imports only from its own or lower layers.
LAYERS = [{"zcausal", "zcausal.errors", "zcausal.runs", "zcausal.bank", "zcausal.stats", "zcausal.transport",
           "zcausal.ard_mmd", "zcausal.problems", "zcausal.labels", "zcausal.prereg",
           "zcausal.summaries", "zcausal.placement", "zcausal.conditions"},
          {"common"},
          {"zcausal.decoding", "zcausal.fast_decode", "zcausal.interchange", "zcausal.das",
           "zcausal.patching", "zcausal.cost",
           "zcausal.answered", "zcausal.question", "zcausal.attention", "zcausal.layer_choice"},
          {"exp_a_patching", "exp_b_residual", "exp_c_ard_mmd", "exp_d_bridge",
           "exp_e_layer_sweep"},
          {"report", "bench", "study"}]


def tracked_top_level():
    import subprocess
    names = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.split()
    return {n.split("/")[0] for n in names if not n.startswith(".")}


def test_the_top_level_holds_what_a_user_runs():
    assert tracked_top_level() <= TOP_LEVEL


def _layer(module):
    for i, group in enumerate(LAYERS):
        if module in group or any(module.startswith(g + ".") for g in group - {"zcausal"}):
            return i
    return None


def _project_imports(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "zcausal" or node.module == "zcausal.summaries":
                yield from (f"{node.module}.{a.name}" for a in node.names)
            else:
                yield node.module


def _modules():
    for path in sorted(REPO.glob("*.py")) + sorted((REPO / "zcausal").rglob("*.py")):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts).replace(".__init__", "")
        yield name, path


@pytest.mark.parametrize("name,path", list(_modules()), ids=lambda x: str(x))
def test_imports_go_only_downward_and_files_stay_small(name, path):
    own = _layer(name)
    assert own is not None, f"{name} is in no layer of LAYERS"
    for imported in _project_imports(path):
        layer = _layer(imported)
        if layer is not None:
            assert layer <= own, f"{name} (layer {own}) imports {imported} (layer {layer})"
    assert len(path.read_text(encoding="utf-8").splitlines()) <= 760, f"{path.name} is too long"
    private = re.findall(r"\b(?:common|runs|problems|stats|decoding|interchange|das|answered)"
                         r"\._[a-z]\w*", path.read_text(encoding="utf-8"))
    assert not private, f"{name} uses another module's private names: {private}"
    imported_private = [f"{node.module}.{a.name}" for node in ast.walk(ast.parse(
        path.read_text(encoding="utf-8"))) if isinstance(node, ast.ImportFrom) and node.module
        and node.module.split(".")[0] in ("common", "zcausal") for a in node.names
        if a.name.startswith("_")]
    assert not imported_private, \
        f"{name} imports another module's private names: {imported_private}"


def test_no_module_imports_itself_through_others():
    """No cycle in the project's import graph, imports inside functions included (the layers
    above cannot see one between modules of the same layer, such as a summary's text and tables)."""
    modules = dict(_modules())
    graph = {name: {i for i in _project_imports(path) if i in modules and i != name}
             for name, path in modules.items()}
    done, stack = set(), []

    def visit(name):
        if name in stack:
            cycle = stack[stack.index(name):] + [name]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if name in done:
            return
        stack.append(name)
        for imported in sorted(graph[name]):
            visit(imported)
        stack.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)


def _parser(script):
    return script.build_parser() if hasattr(script, "build_parser") else None


def _actions(script):
    import argparse
    parser = _parser(script)
    if parser is None:  # parse_args builds its own parser: catch it
        captured = {}
        real = argparse.ArgumentParser.parse_args

        def grab(self, args=None, namespace=None):
            captured["parser"] = self
            return real(self, ["--model", "tiny-random"], namespace)
        argparse.ArgumentParser.parse_args = grab
        try:
            script.parse_args([])
        except SystemExit:
            pass
        finally:
            argparse.ArgumentParser.parse_args = real
        parser = captured["parser"]
    return {opt: a for a in parser._actions for opt in a.option_strings}


@pytest.mark.parametrize("letter", sorted(SCRIPTS))
def test_every_script_shares_the_conventions(letter):
    actions = _actions(SCRIPTS[letter])
    for flag in ("--replot", "--smoke", "--k", "--model", "--out", "--overwrite", "--resume",
                 "--seed"):
        assert flag in actions, f"{letter} has no {flag}"
    assert actions["--k"].nargs == "+", f"{letter}: --k takes one or several values"
    assert "--summarize" not in actions
    if "--n-random" in actions:
        assert actions["--n-random"].type is int


def _all_parsers():
    import bench
    import study
    return {**{letter: _actions(script) for letter, script in SCRIPTS.items()},
            "bench": _actions(bench), "study": _actions(study)}


def test_a_flag_name_means_one_thing_in_every_script_and_in_bench_and_study():
    """The shared flags: --layer (also spelled --basis-layer) and --depth name the basis layer,
    one or several values, everywhere; --replot has one help; --n-random one default unless the
    help says why; --limit is the number of problems and --decode the decode loop wherever they
    appear; and any flag two commands share has the same type and nargs."""
    import common
    from zcausal import decoding, labels, stats
    parsers = _all_parsers()
    for letter in SCRIPTS:
        actions = parsers[letter]
        layer, depth = actions["--layer"], actions["--depth"]
        assert actions["--basis-layer"] is layer and layer.dest == "layer", letter
        assert (layer.nargs, layer.type, depth.nargs, depth.type) == ("+", int, "+", float), letter
        assert layer.help.startswith("basis layer: the decoder layer whose Z is built"), letter
        assert depth.help.startswith("instead of --layer: the basis layer round(F x"), letter
        assert actions["--replot"].help == common.REPLOT_HELP, letter
    for name, actions in parsers.items():
        if "--n-random" in actions:
            n_random = actions["--n-random"]
            assert n_random.default == stats.N_RANDOM or (
                f"default {n_random.default}, not {stats.N_RANDOM}, because" in n_random.help), name
        if "--limit" in actions:
            assert actions["--limit"].type is int and actions["--limit"].nargs is None, name
            assert actions["--limit"].help.startswith("use the first N pairs"), name
        if "--decode" in actions:
            assert tuple(actions["--decode"].choices) == tuple(decoding.ENGINES), name
            assert actions["--decode"].help == parsers["A"]["--decode"].help, name
    assert "--decode" in parsers["bench"] and "--limit" in parsers["bench"]
    shared = {}
    for name, actions in parsers.items():
        for flag, action in actions.items():
            if flag.startswith("--") and flag != "--help":
                shared.setdefault(flag, []).append((name, action))
    for flag, uses in shared.items():  # (choices may differ)
        kinds = {(a.type, a.nargs) for _, a in uses}
        assert len(kinds) == 1, f"{flag} differs between {[n for n, _ in uses]}: {kinds}"
    assert stats.N_RANDOM == labels.min_draws()  # the fewest draws whose rank test reaches 0.05


def test_help_cites_no_document_outside_the_repository():
    """--help needs no plan, notes or earlier phase to be read."""
    for name, actions in _all_parsers().items():
        texts = [a.help or "" for a in set(actions.values())]
        parser_doc = SCRIPTS[name].__doc__ if name in SCRIPTS else ""
        for text in texts + [parser_doc]:
            assert not re.search(r"NOTES|[Pp]lan [A-E]\.?\d|\b[A-E]\.\d\b|Phase \d", text), \
                (name, text[:200])
