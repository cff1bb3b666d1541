"""The basis layer a script reads, the same flags everywhere: --layer L (also spelled
--basis-layer), the decoder layer whose Z is built, or --depth F, the layer round(F x number of
layers); by default the plan's layer 32 of 36 at the same fraction of the model's depth. Both take
one or several values; A runs each, B-E read one and refuse several.

    layer_choice.add_layer_args(parser, ", used for every transition")      # in build_parser
    basis = layer_choice.resolve_layer(config, args.layer, args.depth)     # in validate
"""
import common
from zcausal.runs import UsageError


def add_layer_args(parser, what, several=False):
    """--layer L and --depth F on a script's parser; `what` says what else the script does with
    the basis layer, `several` whether it runs several (A) or reads one (B-E)."""
    count = ("one or several, each run in turn" if several
             else "one value: the script reads one basis layer, run it once per layer")
    parser.add_argument("--layer", "--basis-layer", dest="layer", type=int, nargs="+",
                        default=None, metavar="L",
                        help=f"basis layer: the decoder layer whose Z is built{what}; {count} "
                             f"(default: layer 32 of 36 at the same fraction of this model's "
                             f"depth: 32 on Qwen2.5-3B, 21 of 24, 25 of 28)")
    parser.add_argument("--depth", type=float, nargs="+", default=None, metavar="F",
                        help="instead of --layer: the basis layer round(F x number of layers), the "
                             "same depth on every model (0.889: 32 of 36, 25 of 28, 21 of 24)")
    return parser


def resolve_layers(model_or_config, layer, depth):
    """The basis layers, a list, named by --layer or by --depth (common.depth_to_layer), each a
    list, a number or None; with neither, the plan's layer at the same depth
    (common.plan_layer_at_depth). Both, an unknown layer or a fraction outside (0, 1): a
    UsageError naming the flag."""
    if layer is not None and depth is not None:
        raise UsageError("pass --layer or --depth, not both")
    if layer is not None:
        return [common.check_layer(model_or_config, one) for one in _listed(layer)]
    if depth is not None:
        return [common.depth_to_layer(model_or_config, one) for one in _listed(depth)]
    return [common.plan_layer_at_depth(model_or_config)]


def resolve_layer(model_or_config, layer, depth):
    """The one basis layer of a script that reads one (resolve_layers): several values are a
    UsageError saying to run the script once per layer."""
    for flag, values in (("--layer", layer), ("--depth", depth)):
        if isinstance(values, (list, tuple)) and len(values) > 1:
            raise UsageError(f"{flag} {' '.join(map(str, values))}: this script reads one basis "
                             f"layer; run it once per layer")
    return resolve_layers(model_or_config, layer, depth)[0]


def _listed(values):
    return values if isinstance(values, (list, tuple)) else [values]
