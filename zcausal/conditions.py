"""How random subspaces are seeded (A, D and E: random_seed, the one rule), and E's choice of
draws per layer or shared by the layers, with what that means for its tests
(interchange.make_conditions builds a row's conditions from it).

The random draws are drawn either independently at every layer (`per-layer`, the default of new
runs) or as the same subspaces at every layer (`shared`, every run before the choice existed).
The family-wise best-layer test ranks Z's largest value over the layers among each draw's largest
over the same layers; that is exchangeable only when a draw varies over the layers as Z does:
z_layer (another Z at every layer) against per-layer draws, z_basis (one subspace at every layer)
against shared ones. Against per-layer draws z_basis's test is conservative (one subspace's
values are correlated over the layers, so its maximum is smaller than that of independent ones);
against shared draws z_layer's test is not valid and is read as exploratory
(zcausal/summaries/exp_e_tables.py).
"""
import json
from pathlib import Path

import numpy as np

RANDOM_DRAWS = ("per-layer", "shared")
SHARED_FORMULA = "seed * 1000003 + k * 1009 + draw"
PER_LAYER_FORMULA = "numpy SeedSequence([seed, k, draw, layer]).generate_state(1)[0]"
# why z_layer's family-wise test against shared draws is exploratory (summaries say it)
NOT_EXCHANGEABLE = ("exploratory: draws shared by the layers are not exchangeable with a Z that "
                    "differs per layer")


def random_seed(seed, k, draw, layer=None):
    """Seed of random draw `draw` of dimension k: SHARED_FORMULA (the same draws at every layer
    and in every run; A's and D's draws) when `layer` is None, else one drawn from (seed, k, draw,
    layer), independent per layer."""
    if layer is None:
        return int(seed) * 1_000_003 + k * 1_009 + draw
    return int(np.random.SeedSequence([seed, k, draw, layer]).generate_state(1)[0])


def seed_formula(mode):
    """What config.json records of how the draws were seeded under --random-draws `mode`."""
    return SHARED_FORMULA if mode == "shared" else PER_LAYER_FORMULA


def draws_mode(config):
    """--random-draws of a run's config.json: `shared` for runs from before the flag existed."""
    return ((config or {}).get("args") or {}).get("random_draws") or "shared"


def resolve_draws(args):
    """--random-draws when left out: the mode of the run --resume continues (`shared` for a run
    from before the flag), else per-layer."""
    if args.random_draws is not None:
        return args.random_draws
    config = Path(args.out) / "config.json"
    if args.resume and config.is_file():
        return draws_mode(json.loads(config.read_text(encoding="utf-8")))
    return "per-layer"


def draws_layer(args, layer):
    """The `layer` argument of interchange.make_conditions under args.random_draws: the layer itself
    (per-layer) or None (shared)."""
    return layer if getattr(args, "random_draws", "shared") == "per-layer" else None
