"""Per-stage time of a tiny job through the Serve handle (`GenerationResult.timings`), medians of 7,
on the stack `cinevivid up` runs from serve_config.yaml (`loadtests.stack`; deviations printed).

    python -m loadtests.bench_stages [--threads N]
"""
import argparse
import statistics
import time


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads of every model stage (default: the config's; a printed deviation)")
    args = ap.parse_args(argv)
    from client.handle import GeneratorClient
    from loadtests.stack import local_stack

    with local_stack(threads=args.threads) as stack:
        c = GeneratorClient(stack.app)
        spec = {"prompt": "a red fox running through fresh snow, golden hour", "negative_prompt": "", "seed": 1234,
                "width": 64, "height": 64, "num_frames": 9, "num_inference_steps": 4}
        for _ in range(2):
            c.generate(spec)
        rows = {}
        for _ in range(7):
            t0 = time.time()
            r = c.generate(spec)
            total = time.time() - t0
            for t in r.timings:
                rows.setdefault(t.stage, []).append(t.seconds * 1000)
            rows.setdefault("call total", []).append(total * 1000)
        print({k: round(statistics.median(v), 1) for k, v in rows.items()})


if __name__ == "__main__":
    main()
