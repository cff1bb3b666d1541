"""Run bookkeeping shared by every script: usage errors and the command-line exit, seeds, output
folders, config.json, CSV/JSON I/O and figure files. The lowest module: it imports no project code.
"""
import json
import platform
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent


class UsageError(Exception):
    """Bad input from the user. Scripts print the message as one line and exit with status 2."""


def run_cli(main, args):
    """Run `main(args)`, turning a UsageError into one clear line on stderr and exit status 2."""
    try:
        return main(args)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_out_dir(out, overwrite=False):
    """Create `out`; refuse (UsageError) to reuse a non-empty folder unless overwrite is set."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"{out} already holds results; pass --out NEW_DIR or --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    return out


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
    config = {"command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
              "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "git_commit": _git_commit(),
              "versions": {"python": platform.python_version(), "torch": torch.__version__,
                           "transformers": transformers.__version__, "numpy": np.__version__}}
    if model is not None:
        param = next(model.parameters())
        config["model"] = {"name_or_path": getattr(model, "name_or_path_for_results", None),
                           "revision": getattr(model.config, "_commit_hash", None),
                           "dtype": str(param.dtype).replace("torch.", ""),
                           "device": str(param.device),
                           "device_name": (torch.cuda.get_device_name(param.device)
                                           if param.device.type == "cuda" else platform.processor()
                                           or platform.machine()),
                           "num_layers": model.config.num_hidden_layers,
                           "hidden_size": model.config.hidden_size}
    config.update(extra)
    return config


def write_json(path, obj):
    Path(path).write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n",
                          encoding="utf-8")


def save_figure(fig, path, dpi=120):
    """Lay out, write and close a matplotlib figure (closing frees it in long runs)."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def figure_path(args, name):
    """figures/<out folder name>_<name>.png: runs into different --out folders never collide."""
    Path(args.figures).mkdir(parents=True, exist_ok=True)
    return Path(args.figures) / f"{Path(args.out).name}_{name}.png"


def write_csv(frame, path, append=False):
    """Write (or append to) a CSV that load_csv reads back exactly. Every string is quoted:
    pandas leaves a lone carriage return unquoted, which splits a generated text over two lines."""
    import csv
    path = Path(path)
    frame.to_csv(path, mode="a" if append else "w", header=not (append and path.exists()),
                 index=False, quoting=csv.QUOTE_NONNUMERIC)


def load_csv(path):
    """Read a CSV written by write_csv; empty fields are NaN, the text "none" stays a string."""
    import pandas as pd
    return pd.read_csv(path, keep_default_na=False, na_values=[""])
