"""The support package of the LEQ reference implementation: everything a reader does NOT need to
understand LEQ (as CleanRL's cleanrl_utils). The four stages at the top level hold the algorithm:
world_model.py, pretrain.py, leq.py and evaluate.py. Nothing here imports a stage.

  common.py         the user-error type, flag checks, a task's static facts, true termination functions
  tasks.py          the task registry: names, datasets (D4RL qlearning_dataset semantics), envs, scores
  mazes.py          the built-in PointMaze world: layouts, env, waypoint controller, dataset generator
  d4rl_tasks.py     the optional d4rl package: its envs and dataset files, the ultra mazes
  ogbench_tasks.py  OGBench's single-task mazes, and a local generator of its PointMaze data
  minari_tasks.py   Minari datasets
  artifacts.py      .npz artifacts (atomic writes, validated loads), checkpoints, fingerprints, locks, metrics log
  cli.py            tyro parsing, one-line errors, SIGINT/SIGTERM at chunk boundaries, the XLA CPU option
  upstream.py       leq.py's upstream stages: find or make world_model.npz and pretrain.npz, check them
  many_seeds.py     leq.py --num-seeds N: leq.py's steps vmapped over a seed axis
  plots.py          maze trajectory pictures, learning curves, video
"""
