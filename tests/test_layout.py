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
           "zcausal.summaries", "zcausal.placement"},
          {"common"},
          {"zcausal.decoding", "zcausal.fast_decode", "zcausal.interchange", "zcausal.das",
           "zcausal.patching", "zcausal.cost",
           "zcausal.answered", "zcausal.question", "zcausal.attention"},
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
