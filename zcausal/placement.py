"""Where a model's weights sit under --device-map (a model larger than one GPU): the map a user
passes, checked before anything loads; a model built in memory dispatched as from_pretrained
dispatches a checkpoint; and what the rest of the code asks of a possibly split model: the device
its inputs go to, whether it is split, its weights (also where accelerate offloaded them), and
the map config.json records. accelerate does the placing: each layer gets a hook that moves its
inputs to the layer's device (and loads offloaded weights for the forward), and the model's output
comes back on its input's device. common.py re-exports the accessors.

    python exp_e_layer_sweep.py --model Qwen/Qwen2.5-72B --device-map auto
"""
import json
import re
from pathlib import Path

import torch

from zcausal.runs import UsageError

# What --device-map takes besides a JSON file: accelerate's strategies for placing a model's
# layers on the visible GPUs, then the CPU (the names from_pretrained(device_map=...) takes).
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def add_device_map_arg(parser):
    """--device-map, for a model larger than one GPU (every script and study.py)."""
    parser.add_argument("--device-map", default=None, metavar="MAP",
                        help="spread the model's layers over devices instead of --device: auto "
                             "(the visible GPUs, then CPU memory), balanced, balanced_low_0, "
                             "sequential, or a JSON file mapping module names to devices "
                             "({\"model.layers.0\": 0, ..., \"lm_head\": 1}); config.json "
                             "records where each module went. Default: the whole model on --device")
    return parser


def check_device_map(device_map, device=None):
    """--device-map (resolve_device_map) given with --device `device`, before anything loads:
    both together are a UsageError (the map names the devices). Returns the kind of device the
    map computes on, "cuda" or "cpu" (map_device)."""
    if device is not None:
        raise UsageError(f"pass --device or --device-map, not both (the map names the devices; "
                         f"--device {device} would put the whole model on one)")
    return map_device(resolve_device_map(device_map)).type


def resolve_device_map(value):
    """--device-map: None (the whole model on --device), one of DEVICE_MAP_STRATEGIES, or a JSON
    file (from Python, a dict) mapping module names to devices ({"model.embed_tokens": 0,
    "model.layers.0": 0, ..., "lm_head": 1}; a device is a GPU index, "cuda:N", "cpu" or "disk":
    weights kept in CPU memory or read from the checkpoint for each forward, the layer run on the
    first GPU). Returns None, the strategy, or the dict; anything else, or a map without
    accelerate installed, is a UsageError."""
    if value is None:
        return None
    try:
        import accelerate  # noqa: F401  (from_pretrained's device_map needs it)
    except ImportError:
        raise UsageError("--device-map needs the accelerate package: pip install accelerate "
                         "(the version in requirements.txt)") from None
    if isinstance(value, str) and value in DEVICE_MAP_STRATEGIES:
        return value
    mapping = value if isinstance(value, dict) else _read_device_map(value)
    if not isinstance(mapping, dict) or not mapping or \
            not all(_map_device(device) for device in mapping.values()):
        raise UsageError(f"--device-map {value}: write a non-empty JSON object from module names "
                         f"to devices: a GPU index, \"cuda:N\", \"cpu\" or \"disk\"")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    named = {int(str(d).rpartition(":")[2]) for d in mapping.values() if _map_device(d) == "cuda"}
    missing = [f"cuda:{index}" for index in sorted(named) if index >= gpus]
    if missing:
        raise UsageError(f"--device-map {value}: this machine has {gpus} visible GPU(s), the map "
                         f"names {', '.join(missing)}; pass a map of the devices it has")
    return mapping


def _read_device_map(value):
    path = Path(value).expanduser()
    if not path.is_file():
        raise UsageError(f"--device-map {value}: pass one of {', '.join(DEVICE_MAP_STRATEGIES)} "
                         f"or a JSON file mapping module names to devices")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise UsageError(f"--device-map {value}: not a JSON file ({err}); write an object such "
                         f"as {{\"model.layers.0\": 0, \"lm_head\": \"cpu\"}}") from None


def map_device(mapping):
    """The kind of device a resolved device map computes on (what --dtype's default and the
    batch sizes follow): cuda where the map names a GPU (a strategy: where one is visible), else
    cpu."""
    if isinstance(mapping, str):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = any(_map_device(device) == "cuda" for device in mapping.values())
    return torch.device("cuda" if on_gpu else "cpu")


def _map_device(device):
    """"cuda", "cpu" or "disk" for a device map's value, None for one that names no device."""
    if isinstance(device, int) and not isinstance(device, bool) and device >= 0:
        return "cuda"
    if device in ("cpu", "disk"):
        return device
    if isinstance(device, str) and re.fullmatch(r"cuda:\d+", device):
        return "cuda"
    return None


def map_error(err, device_map):
    """from_pretrained's error `err` as a UsageError when it is about the device map (a module the
    map does not place, disk offload without a folder), else None (an error of the checkpoint)."""
    if device_map is not None and ("device_map" in str(err) or "offload" in str(err)):
        return UsageError(f"--device-map: {err}")
    return None


def dispatch(model, device_map, offload_folder=None):
    """A model built in memory, placed as from_pretrained places a checkpoint: a strategy name
    becomes a map (accelerate.infer_auto_device_map over the visible devices' free memory), then
    accelerate.dispatch_model moves the layers and hooks them. Weights mapped to "disk" go to
    `offload_folder` (None: a temporary folder, removed when the process ends)."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory, get_max_memory
    no_split = model._no_split_modules
    if isinstance(device_map, str):
        memory = get_max_memory() if device_map == "sequential" else get_balanced_memory(
            model, no_split_module_classes=no_split, low_zero=device_map == "balanced_low_0")
        device_map = infer_auto_device_map(model, max_memory=memory,
                                           no_split_module_classes=no_split)
    if "disk" in device_map.values() and offload_folder is None:
        import atexit
        import shutil
        import tempfile
        offload_folder = tempfile.mkdtemp(prefix="offload-")
        atexit.register(shutil.rmtree, offload_folder, ignore_errors=True)
    try:
        model = dispatch_model(model, device_map, offload_dir=offload_folder,
                               skip_keys=model._skip_keys_device_placement)
    except ValueError as err:  # e.g. a module the map does not place
        raise UsageError(f"--device-map: {err}") from None
    model.hf_device_map = dict(device_map)
    return model


def input_device(model):
    """Where the model reads its input ids: the embedding's device. Under a device map (layers on
    several devices, some weights offloaded and left on the meta device between forwards), the
    device accelerate runs the embedding on; tensors built for the model's input go here, and
    everything derived from the prompt is kept here (hooks move what they need to each layer)."""
    embed = model.get_input_embeddings()
    hook = getattr(embed, "_hf_hook", None)
    for one in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
        if getattr(one, "execution_device", None) is not None:
            return torch.device(one.execution_device)
    return embed.weight.device


def device_split(model):
    """Whether a device map spread the weights over several devices or offloaded some (to the CPU
    or disk), so that no single device holds them all (model.hf_device_map, from --device-map)."""
    placed = set(map(str, (getattr(model, "hf_device_map", None) or {}).values()))
    return len(placed) > 1 or "disk" in placed


def read_weight(module, name="weight"):
    """A module's own parameter `name`, detached, where it lives; also where a device map
    offloaded it (accelerate leaves offloaded weights on the meta device between forwards and loads
    them for each forward: align_module_device loads a copy the same way, on the device the module
    runs on)."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None or not getattr(hook, "offload", False):
        return getattr(module, name).detach()
    from accelerate.utils import align_module_device
    with align_module_device(module):
        return getattr(module, name).detach().clone()


def device_map_record(model):
    """model.hf_device_map as config.json keeps it ({module: "cuda:0" | "cpu" | "disk"}), or None
    for a model loaded whole on one device."""
    placed = getattr(model, "hf_device_map", None)
    if placed is None:
        return None
    return {name: f"cuda:{device}" if isinstance(device, int) else str(device)
            for name, device in placed.items()}
