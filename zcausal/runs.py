"""Run bookkeeping shared by every script: usage errors and the command-line exit, seeds, output
folders, config.json, CSV/JSON I/O and figure files. The lowest module but zcausal/errors.py (its
UsageError, which this module passes on as runs.UsageError) and, to record a model's placement in
config.json, zcausal/placement.py.
"""
import argparse
import json
import platform
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from zcausal import placement
from zcausal.errors import UsageError  # noqa: F401 - scripts raise it as runs.UsageError

REPO = Path(__file__).resolve().parent.parent  # the repository root (this file is zcausal/runs.py)
DEFAULT_FIGURES = Path("figures")  # every script's --figures default, relative to the working folder


class _Terminated(Exception):
    """SIGTERM, turned into an exception so that `finally` blocks and hook removal still run."""


def _raise_terminated(signum, frame):
    raise _Terminated


def run_cli(main, args, continue_with="the same command with --resume"):
    """Run `main(args)` as a command: a UsageError becomes one line on stderr and exit status 2;
    Ctrl-C (exit 130) and SIGTERM (exit 143) end with one line saying how to continue (rerun
    `continue_with`). Finished work is whatever the script already wrote to disk (scripts write as
    they go)."""
    import signal
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return main(args)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except (KeyboardInterrupt, _Terminated) as err:
        code = 130 if isinstance(err, KeyboardInterrupt) else 143
        out = getattr(args, "out", None)
        where = f" in {out}" if out is not None else ""
        print(f"interrupted: finished work is kept{where}; rerun {continue_with} to continue",
              file=sys.stderr)
        sys.exit(code)
    finally:
        signal.signal(signal.SIGTERM, previous)


def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# Flags that never change what a run computes: a resumed run may differ from its config.json in
# these and nothing else (--device-map moves weights between devices, each layer computes alike).
RESUME_IGNORED = {"resume", "overwrite", "batch_size", "figures", "summarize", "replot", "decode",
                  "cache_dir", "device_map"}


# Flags that count something (their dest, as every script spells it) -> the least value that
# means anything; validate_common refuses a smaller one. A script without the flag skips it, and
# None (a default resolved later) is left alone.
COUNTS = {"seed": 0, "batch_size": 1, "limit": 1, "max_new_tokens": 1, "new_tokens": 1,
          "n_random": 0, "n_random_logprob": 0, "n_shuffles": 1, "n_folds": 2, "min_pairs": 2,
          "steps": 1, "min_steps": 0, "log_every": 1, "last_m": 1, "decode_limit": 0,
          "decode_random": 0, "das_steps": 1, "das_batch": 1, "das_eval_every": 1,
          "das_partners": 1, "das_test_min": 0, "min_span": 0,
          "sweep_limit": 2}  # a swap pair needs a partner


def flag_name(dest):
    """The command-line flag of an argparse dest: batch_size -> --batch-size."""
    return "--" + dest.replace("_", "-")


def check_counts(args):
    """Every flag of COUNTS the command has is at least its least value (a seed too: numpy takes
    0 to 2**32 - 1)."""
    for dest, least in COUNTS.items():
        value = getattr(args, dest, None)
        if value is not None and value < least:
            raise UsageError(f"{flag_name(dest)} {value}: pass {least} or more")
    if getattr(args, "seed", None) is not None and args.seed >= 2 ** 32:
        raise UsageError(f"--seed {args.seed}: pass a seed below 2**32")


def check_folder_arg(flag, path, given=None):
    """`path`, given as `flag` (its value `given`, default `path`), is a folder or can be made one:
    no part of it is a file, and the nearest folder of it that exists takes a new entry. That is
    tried with an empty folder, removed at once: os.access says yes to root everywhere, even on a
    read-only mount or under /proc."""
    import tempfile
    path = Path(path)
    shown = f"{flag} {given or path}"
    for part in [path] + list(path.parents):
        if part.exists() and not part.is_dir():
            raise UsageError(f"{shown}: {part} is a file, not a folder; pass "
                             f"{'a path inside a folder' if given else 'a folder path'}")
    nearest = next(part for part in [path] + list(path.parents) if part.exists())
    try:
        Path(tempfile.mkdtemp(prefix=".write-check-", dir=nearest)).rmdir()
    except OSError as err:
        raise UsageError(f"{shown}: cannot create folders in {nearest} "
                         f"({err.strerror or err}); pass a folder you can write to") from None
    return path


def check_file_arg(flag, path):
    """`path`, given as `flag`, is a file this command may write: not a folder, and its folder
    exists or can be made (check_folder_arg)."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a folder; pass a file path")
    check_folder_arg(flag, path.parent, given=path)
    return path


def check_out_arg(out):
    """--out must be a folder (or not exist yet): one clear line instead of NotADirectoryError."""
    return check_folder_arg("--out", out)


def stored_script(out):
    """The script that made the run in `out` (its config.json's "script"), or None."""
    try:
        return json.loads((Path(out) / "config.json").read_text(encoding="utf-8")).get("script")
    except (OSError, ValueError, AttributeError):
        return None


def check_out_dir(out, overwrite=False, resume=False, script=None):
    """What --out may hold, checked without writing: a new run needs an empty or absent folder;
    --resume a run of `script` (its config.json, made by the same script); --overwrite a run of
    this project. --overwrite and --resume together are refused."""
    out = check_out_arg(out)
    if overwrite and resume:
        raise UsageError("--overwrite and --resume contradict each other: pass --resume to "
                         "continue the run in --out, --overwrite to replace it")
    if resume:
        if not (out / "config.json").is_file():
            raise UsageError(f"--resume: {out} holds no run to continue (no config.json); "
                             f"drop --resume to start one")
        made_by = stored_script(out)
        if script and made_by and made_by != script:
            raise UsageError(f"--resume: the run in {out} was made by {made_by}, not {script}; "
                             f"continue it with {made_by}, or pass another --out")
    elif out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UsageError(f"{out} already holds results; pass --resume to continue that run, "
                             f"--overwrite to replace it, or a new --out")
        if not (out / "config.json").is_file():
            raise UsageError(f"--overwrite: {out} holds files that are not a run of this project "
                             f"(no config.json); pass a new --out")
    return out


def validate_common(args, script=None):
    """The checks every script makes before it reads a model or writes a file, on the flags they
    share: the counts (check_counts), --out, --figures and --cache-dir folders or creatable, and
    what --out holds (check_out_dir; not for --replot, which reads the run there). `script`:
    the script's file name (default: the file of the caller, the script's main)."""
    script = script or Path(sys._getframe(1).f_code.co_filename).name
    check_counts(args)
    check_out_arg(args.out)
    for dest in ("figures", "cache_dir"):
        if getattr(args, dest, None) is not None:
            check_folder_arg(flag_name(dest), getattr(args, dest))
    if not getattr(args, "replot", False):
        check_out_dir(args.out, getattr(args, "overwrite", False), getattr(args, "resume", False),
                      script)
    return args


def comparable_args(args):
    """The flags of a run as config.json stores them, minus RESUME_IGNORED."""
    stored = json.loads(json.dumps(_args_dict(args), default=str))
    return {k: v for k, v in stored.items() if k not in RESUME_IGNORED}


def _args_dict(args):
    return {k: portable(v) for k, v in vars(args).items()}


def portable(value):
    """A flag's value as config.json stores it: paths as strings, and no path of this machine
    outside the repository (inside it: relative to it; under the home folder: ~/...; elsewhere,
    absolute or ../-relative: <outside>/name), so committed results can be traced but name no
    machine's folders."""
    if isinstance(value, (list, tuple)):
        return [portable(v) for v in value]
    if not isinstance(value, (str, Path)):
        return value
    text = str(value)
    if not text.startswith("/"):
        if not text.startswith("..") or (Path.cwd() / text).resolve().is_relative_to(REPO):
            return text  # as typed (a relative path inside the repository, a hub id, a name)
        path = (Path.cwd() / text).resolve()
    else:
        path = Path(text)
    if path.is_relative_to(REPO):
        return str(path.relative_to(REPO)) or "."
    if path.is_relative_to(Path.home()):
        return "~/" + str(path.relative_to(Path.home()))
    return f"<outside>/{path.name}"


# Flags renamed since runs were committed: the old name in a config.json's "args" -> today's dest.
RENAMED = {"basis_layer": "layer"}


def current_names(stored):
    """A config.json's "args" under today's flag names (RENAMED), so a run made before a rename
    still resumes."""
    return {RENAMED.get(k, k): v for k, v in stored.items()}


def _same_flag(stored, current):
    """A stored value equals the current one, a single value also the list of it (flags that took
    one value and now take one or several: --layer, --depth, --k)."""
    return stored == current or (isinstance(current, list) and [stored] == current)


def check_resume(out, args):
    """--resume on the run in `out` (check_out_dir found its config.json): its flags must be this
    command's (RESUME_IGNORED aside; a run made before a flag was renamed or added is read under
    today's names, current_names); else a UsageError naming the flags that differ."""
    stored = current_names(json.loads((Path(out) / "config.json").read_text(encoding="utf-8"))
                           .get("args", {}))
    stored = {k: v for k, v in stored.items() if k not in RESUME_IGNORED}
    current = comparable_args(args)
    # a flag the run's config.json does not name was added since: that run could not set it
    differ = sorted(k for k in stored if not _same_flag(stored[k], current.get(k)))
    if differ:
        shown = ", ".join(f"--{k.replace('_', '-')} (was {stored.get(k)!r}, now {current.get(k)!r})"
                          for k in differ[:4])
        raise UsageError(f"--resume: this command differs from the run in {out} in {shown}; "
                         f"rerun with the flags of its config.json, or use a new --out")


def prepare_out_dir(out, overwrite=False, resume=False, args=None, figures=None):
    """Create `out` for a run. A folder that already holds files is refused unless
    - resume: it holds a run of the calling script with the same flags (check_out_dir,
      check_resume; needs `args`), kept as it is;
    - overwrite: it holds a run of this project (a config.json), whose files are all removed
      first, with its figure folder (`figures`, see figure_dir), so nothing stale survives.
    """
    out = check_out_dir(out, overwrite, resume, Path(sys._getframe(1).f_code.co_filename).name)
    if resume:
        check_resume(out, args)
        return out
    if out.exists() and any(out.iterdir()):
        for folder in (out, figure_dir(out, figures) if figures is not None else None):
            if folder is not None and folder.is_dir():
                _empty_folder(folder)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _empty_folder(folder):
    import shutil
    for child in folder.iterdir():
        shutil.rmtree(child) if child.is_dir() else child.unlink()


def _git_commit():
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True,
                               text=True, check=True).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def run_config(args, model=None, **extra):
    """Everything needed to trace a result to the command that made it."""
    import transformers
    # The script whose main() called this; its command line only when it was run as a command
    # (a main() called from Python, as in the tests, has no command of its own).
    script = Path(sys._getframe(1).f_code.co_filename).name
    command = " ".join([script] + [portable(a) for a in sys.argv[1:]]) \
        if Path(sys.argv[0]).name == script else None
    config = {"script": script, "command": command,
              "args": _args_dict(args),
              "git_commit": _git_commit(),
              "versions": {"python": platform.python_version(), "torch": torch.__version__,
                           "transformers": transformers.__version__, "numpy": np.__version__}}
    if model is not None:
        param, device = next(model.parameters()), placement.input_device(model)
        name = getattr(model, "name_or_path_for_results", None)
        config["model"] = {"name_or_path": portable(name),
                           "revision": getattr(model.config, "_commit_hash", None),
                           "dtype": str(param.dtype).replace("torch.", ""),
                           "device": str(device),
                           "device_name": (torch.cuda.get_device_name(device)
                                           if device.type == "cuda" else platform.processor()
                                           or platform.machine()),
                           # where --device-map put each module (None: all on `device`)
                           "device_map": placement.device_map_record(model),
                           "num_layers": model.config.num_hidden_layers,
                           "hidden_size": model.config.hidden_size}
    config.update(extra)
    return config


def write_json(path, obj):
    Path(path).write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n",
                          encoding="utf-8")


def save_figure(fig, path, dpi=120, rect=None):
    """Lay out (tight_layout within `rect`, the whole figure by default), write and close a
    matplotlib figure (closing frees it in long runs). A file that already shows the same pixels
    is left as it is: a --replot under another matplotlib, whose version is written into the PNG,
    does not rewrite a committed figure that looks the same."""
    import io
    import matplotlib.pyplot as plt
    fig.tight_layout(rect=rect)
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=dpi, format=Path(path).suffix.lstrip(".") or "png")
    plt.close(fig)
    if not (Path(path).is_file() and _same_pixels(path, buffer)):
        Path(path).write_bytes(buffer.getvalue())
    return path


def _same_pixels(path, buffer):
    """Whether the image file at `path` and the one in `buffer` decode to the same pixels."""
    import matplotlib.image
    import numpy as np
    try:
        old = matplotlib.image.imread(path)
    except (OSError, ValueError, SyntaxError):  # not an image matplotlib can read: rewrite it
        return False
    buffer.seek(0)
    new = matplotlib.image.imread(buffer, format=Path(path).suffix.lstrip(".") or "png")
    return old.shape == new.shape and np.array_equal(old, new)


def figure_dir(out, figures_root):
    """Where a run's figures go. A run inside the folder that holds the figures root (the
    checkout, for the default --figures figures) mirrors its --out path under the root, from below
    the innermost folder called results: results/r1/exp_a -> figures/r1/exp_a, so two runs never
    share a file. A run anywhere else keeps its figures beside its files, in <out>/figures: a run
    outside the checkout never writes into it. report.py finds a run's figures with this rule."""
    out, root = Path(out).resolve(), Path(figures_root)
    base = root.resolve().parent
    if not out.is_relative_to(base) or out == base:
        return out / "figures"
    below = out.relative_to(base)
    results = [i for i, part in enumerate(below.parts[:-1]) if part == "results"]
    return root / Path(*below.parts[results[-1] + 1:]) if results else root / below


def figure_path(args, name):
    """figure_dir(args.out, args.figures) / <name>.png, the folder created."""
    folder = figure_dir(args.out, args.figures)
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{name}.png"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows every default and keeps the module docstring's layout. A help text that
    already says its default is left as written; a path default is shown as config.json stores
    it (relative to the repository), not as this machine's absolute path."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text.lower() or action.default is argparse.SUPPRESS:
            return text
        if isinstance(action.default, Path):
            return f"{text} (default: {portable(action.default)})"
        return super()._get_help_string(action)


def make_parser(doc):
    """An ArgumentParser whose description is a script's docstring, every default shown."""
    return argparse.ArgumentParser(description=doc, formatter_class=HelpFormatter)


def add_smoke_arg(parser, preset):
    """--smoke: a run of seconds on --model tiny-random; `preset` (dest -> value) fills the flags
    the command leaves at their default (apply_smoke)."""
    def flag(name, value):
        shown = " ".join(map(str, value)) if isinstance(value, list) else value
        return f"--{name.replace('_', '-')} {shown}"
    parser.add_argument("--smoke", action="store_true",
                        help="smoke-run preset for the flags left at their default: "
                             + ", ".join(flag(k, v) for k, v in preset.items()))


def apply_smoke(parser, args, preset, unless=None):
    """args with --smoke's preset in every flag still at its default; `unless` (dest -> dest):
    a preset entry is skipped where the other flag was given (--depth when --layer is)."""
    if args.smoke:
        for name, value in preset.items():
            other = (unless or {}).get(name)
            if getattr(args, name) == parser.get_default(name) and not (
                    other and getattr(args, other) != parser.get_default(other)):
                setattr(args, name, value)
    return args


def write_csv(frame, path, append=False):
    """Write (or append to) a CSV (gzipped when the name ends in .gz) that load_csv reads back
    exactly. Every string is quoted: pandas leaves a lone carriage return unquoted, which splits
    a generated text over two lines. A file that already holds the same table (same_table: its
    numbers equal to the last digits that a pandas or numpy version moves) is left as it is, so a
    --replot does not rewrite a committed table that says the same."""
    import csv
    path = Path(path)
    if not append and path.is_file() and same_table(frame, path):
        return
    # .gz: gzip with a fixed timestamp, so the same rows give the same bytes (appends add members)
    compression = {"method": "gzip", "mtime": 0} if path.suffix == ".gz" else None
    frame.to_csv(path, mode="a" if append else "w", header=not (append and path.exists()),
                 index=False, quoting=csv.QUOTE_NONNUMERIC, compression=compression)


def same_table(frame, path, rtol=1e-9, atol=1e-12):
    """Whether the CSV at `path` holds `frame` as load_csv would read it back from write_csv: the
    same columns and rows, the same text, and numbers equal within rtol (or atol near 0)."""
    import csv
    import io
    import numpy as np
    import pandas as pd
    old = load_csv(path)
    new = load_csv(io.StringIO(frame.to_csv(index=False, quoting=csv.QUOTE_NONNUMERIC)))
    if list(old.columns) != list(new.columns) or old.shape != new.shape:
        return False
    for column in new.columns:
        a, b = old[column], new[column]
        if pd.api.types.is_numeric_dtype(a) and pd.api.types.is_numeric_dtype(b):
            if not np.allclose(a.to_numpy(float), b.to_numpy(float), rtol=rtol, atol=atol,
                               equal_nan=True):
                return False
        elif not a.astype(str).equals(b.astype(str)):
            return False
    return True


def done_values(path, columns):
    """The (tuples of) values of `columns` already in a CSV, for --resume (empty: no file)."""
    if not Path(path).is_file():
        return set()
    frame = load_csv(path)
    return set(zip(*(frame[c].tolist() for c in columns)))


def keep_rows(path, columns, keep):
    """Rewrite a CSV keeping only rows whose `columns` values are in `keep`: on --resume, the
    rows an interrupted step appended before its marking file was written are dropped, not
    duplicated."""
    if Path(path).is_file():
        frame = load_csv(path)
        mask = [values in keep for values in zip(*(frame[c].tolist() for c in columns))]
        write_csv(frame[mask], path)


def load_csv(path, text=()):
    """Read a CSV written by write_csv; empty fields are NaN, the text "none" stays a string, and
    the columns named in `text` stay text ("0000" is not read as the number 0)."""
    import pandas as pd
    return pd.read_csv(path, keep_default_na=False, na_values=[""],
                       dtype={column: str for column in text})
