"""Driver of a Ray job for the two-node test: evaluate a budget of recipes on the cluster.

Run by `ray job submit --working-dir <repo> -- python -m tests.scheduler._cluster_job ...`;
it connects through RAY_ADDRESS (set by Ray for a job's driver) and writes one JSON line per
evaluation to --journal, on the machine where the driver runs.
"""

from __future__ import annotations

import argparse
import json
import os

import ray

from evomerge.recipe import MergeRecipe
from evomerge.scheduler.ray_executor import RayExecutor
from tests.scheduler._ray_fitness import ProbeFactory


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", type=int, required=True)
    parser.add_argument("--workers", type=int, required=True)
    parser.add_argument("--journal", required=True)
    args = parser.parse_args()
    if not os.environ.get("RAY_ADDRESS"):
        raise SystemExit("RAY_ADDRESS is not set; run this under `ray job submit`")
    with RayExecutor(ProbeFactory(sleep=0.1), workers=args.workers) as executor:
        nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
        recipes = [MergeRecipe("linear", ("a", "b"), (0.1 * i, 1.0)) for i in range(args.budget)]
        futures = [executor.submit(r, "fit") for r in recipes]
        with open(args.journal, "w", encoding="utf-8") as out:
            for recipe, future in zip(recipes, futures):
                record = {"recipe": recipe.to_dict(), "score": future.result().to_dict(), "nodes": nodes}
                out.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
