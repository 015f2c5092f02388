"""`cinevivid models ...`: build the embedded tiny model, show where models come from.
The handlers take the parsed arguments; their parsers are in `serve.ops.cli`."""

from __future__ import annotations

import json


def cmd_make_tiny(args) -> int:
    from serve.pipeline.tiny_model import make_tiny_model

    path = make_tiny_model(args.path, seed=args.seed, overwrite=args.overwrite)
    print(path)
    return 0


def cmd_cache(args) -> int:
    from serve.app import default_app_args
    from serve.pipeline.hub_cache import model_cache_stats

    print(json.dumps(model_cache_stats(default_app_args().model), indent=2))
    return 0
