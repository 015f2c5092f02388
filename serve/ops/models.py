"""`cinevivid models ...`: build the embedded tiny model, show where models come from.
The handlers take the parsed arguments; their parsers are in `serve.ops.cli`."""

from __future__ import annotations

import json


def cmd_make_tiny(args) -> int:
    """The T2V model at PATH; the I2V and DF ones beside it, at PATH-i2v and PATH-df."""
    from pathlib import Path

    from serve.pipeline.tiny_model import make_tiny_model

    variants = ("t2v", "i2v", "df") if args.variant == "all" else (args.variant,)
    base = Path(args.path)
    for variant in variants:
        path = base if variant == "t2v" else base.with_name(f"{base.name}-{variant}")
        print(make_tiny_model(path, seed=args.seed, overwrite=args.overwrite, variant=variant))
    return 0


def cmd_cache(args) -> int:
    from serve.app import default_app_args
    from serve.pipeline.hub_cache import model_cache_stats

    print(json.dumps(model_cache_stats(default_app_args().model), indent=2))
    return 0
