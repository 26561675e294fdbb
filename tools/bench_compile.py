"""Per-block ``torch.compile`` (``model.compile=true``, inductor) against eager, on the same training step.

    python tools/bench_compile.py                          # the quickstart DiT stage on CPU
    python tools/bench_compile.py --steps 40 -- model.dit.dim=256

Both sides are ``tools/bench_overhead.py``'s bare loop (the config's data module and model,
pre-loaded batches, ``training_step`` + backward + the module's optimizer), built from the same config and seed in
one process: eager first, then with ``model.compile=true``. Cold start: the compiled run's first
step minus the eager run's first step (graph capture and code generation of every block kind).
Speed-up: eager median step / compiled median step after ``warmup`` steps. Graphs: the number of
graphs dynamo built in the compiled run (``tests/test_compile.py`` checks that no batch after the
warm-up adds one). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json

from bench_overhead import DEFAULT, bare


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30, help="timed steps")
    ap.add_argument("--warmup", type=int, default=5, help="steps before timing")
    ap.add_argument("overrides", nargs="*", help="sora-train overrides (after --), on top of the quickstart DiT")
    args = ap.parse_args(argv)
    from torch._dynamo.utils import counters

    overrides = DEFAULT + list(args.overrides)
    eager = bare(overrides, args.warmup, args.steps)
    compiled = bare(overrides + ["model.compile=true"], args.warmup, args.steps)
    result = {"overrides": overrides, "eager": eager, "compiled": compiled,
              "cold_start_s": compiled["first_s"] - eager["first_s"],
              "speedup": eager["median_s"] / compiled["median_s"], "graphs": counters["stats"]["unique_graphs"]}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
