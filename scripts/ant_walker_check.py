"""How well does an ant walker walk? Both measures, for any walker artifact:

    python scripts/ant_walker_check.py                                   # the walker the generator would take
    python scripts/ant_walker_check.py --walker runs/ant_walker_d4rl__s0/walker.npz --out check.json

1. Issue 37's measure (`ant.reach_trials`): from a fresh start, a goal 4-8 units away, reached
   within 100 steps; with the falls and the share of ants that lay on their back.
2. Long walks (`ant.long_walks`): ants walking as long as a dataset's episode (1000 steps) on an
   open floor, goal after goal, without and with the generator's action noise. A walker can pass
   the first and still turn over within a dataset's episode: the 100-step trials do not last long
   enough to show it (docs/TASKS.md, "The first body: Ant-v5's"; the shipped walker on D4RL's body passes both).

Prints one JSON object (and writes it to --out).
"""

import dataclasses
import json
import os
import sys
from typing import Optional

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from leq_utils import ant  # noqa: E402
from leq_utils import artifacts  # noqa: E402
from leq_utils import cli  # noqa: E402


@dataclasses.dataclass
class Args:
    walker: Optional[str] = None
    """walker artifact (default: the one the generator takes, <data dir>/ant_walker.npz, else the shipped one)"""
    data_dir: Optional[str] = None
    """data folder for the default walker (default: $LEQ_DATA_DIR or ./data)"""
    trials: int = 100
    """issue 37's trials (goals 4-8 units away, 100 steps)"""
    seed: int = 20_000
    """seed of the trials and of the long walks (20,000: the trainer's final measure for its seed 0)"""
    ants: int = 64
    """ants in each long walk"""
    steps: int = 1000
    """steps of each long walk (a built-in ant dataset's episode: 1000)"""
    noises: tuple[float, ...] = (0.0, 0.2)
    """action noise scales of the long walks (the generator's default: 0.2)"""
    out: Optional[str] = None
    """also write the JSON here (atomically)"""


def main(args: Args) -> dict:
    path = args.walker or str(ant.default_walker_path(args.data_dir))
    act, _ = ant.load_walker(path)
    result = {"walker": path, "reach": ant.reach_trials(act, args.trials, seed=args.seed), "long_walks": []}
    for noise in args.noises:
        ants = ant.GoalAnts(args.ants, seed=args.seed, max_steps=args.steps + 1)
        result["long_walks"].append(ant.long_walks(act, ants, args.steps, noise, seed=args.seed))
    print(json.dumps(result, indent=1))
    if args.out:
        artifacts.write_json(args.out, result)
    return result


if __name__ == "__main__":
    cli.run_script(main, Args)
