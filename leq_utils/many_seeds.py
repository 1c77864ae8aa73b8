"""Many seeds in one process: `leq.py --num-seeds N` (leq.train hands such runs to `train` here).

    python leq.py --env pointmaze-umaze --num-seeds 3 --seed 0   # seeds 0, 1, 2

Seeds S .. S+N-1 train in one compiled program: the LEQ state, the expansion buffer and the
random keys get a leading seed axis, and leq.py's update and expansion (the same functions,
`leq.chunk_of` and `leq.expansion`) are vmapped over it, each seed with its own world model and
input statistics as arguments. Each seed keeps its own upstream artifacts (made first when
missing, as for one seed) and gets <run_dir>/seed_<seed>/ holding what a single-seed run folder
holds (config.json, metrics.jsonl, final_eval.json, leq.npz: evaluate.py reads it as any
leq.npz). <run_dir>/metrics.jsonl is the run's one stream: every metric's mean over the seeds,
and the scores' mean and min. One checkpoint file in <run_dir> holds every seed's state (its
arrays named seed_<seed>/...), so a killed run resumes exactly, as a single-seed run does.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from leq_utils import cli
from leq_utils import artifacts
from leq_utils import tasks


# ============================================================================================
# The seed axis
# ============================================================================================

class Seed(NamedTuple):
    """What one seed starts from (leq.setup_seed): its inputs (checked or made), initial state and keys."""
    ds: tasks.Dataset
    wm: object
    done_fn: object
    nets: object
    st: object
    k_train: jnp.ndarray
    k_expand: jnp.ndarray
    inputs: dict  # the fingerprints of the dataset, world model and pretrain.npz


class SeedModels(NamedTuple):
    """What differs between the seeds of a run besides their state: each seed's world model
    (its elites' parameters and input statistics) and its networks' input statistics."""
    wm_params: dict
    wm_mean: jnp.ndarray
    wm_std: jnp.ndarray
    stats_mean: jnp.ndarray
    stats_std: jnp.ndarray


def stack(trees):
    """Trees of the same structure, stacked along a new leading (seed) axis."""
    return jax.tree.map(lambda *x: jnp.stack(x), *trees)


def unstack(tree, i: int):
    """Seed i's slice of a stacked tree."""
    return jax.tree.map(lambda x: x[i], tree)


def seed_models(seeds) -> SeedModels:
    """The SeedModels of [Seed, ...], stacked."""
    return stack([SeedModels(s.wm.params, s.wm.input_mean, s.wm.input_std, *s.nets.stats) for s in seeds])


def for_seed(nets, wm, models: SeedModels):
    """nets and wm of one seed (inside vmap: `models` holds that seed's slice)."""
    return (nets._replace(stats=(models.stats_mean, models.stats_std)),
            wm._replace(params=models.wm_params, input_mean=models.wm_mean, input_std=models.wm_std))


def make_many(leq, nets, wm, done_fn, actor_opt, critic_opt, args):
    """(train_chunk, expand) for N seeds at once: `leq.chunk_of(leq.make_update(...))` and
    `leq.expansion(...)`, built per seed from that seed's models and vmapped over the leading seed
    axis of the state, buffer, models, start states and keys (the dataset is shared, and so are
    the start states with --no-expansion). `nets` and `wm` give the structure; their arrays are
    replaced by each seed's."""
    starts_axis = None if args.no_expansion else 0

    def chunk(st, models, data, starts, n_starts, base_keys, step0, n_steps):
        def one(st, models, starts, n_starts, base_key):
            nets_k, wm_k = for_seed(nets, wm, models)
            update = leq.make_update(nets_k, wm_k, done_fn, actor_opt, critic_opt, args)
            return leq.chunk_of(update)(st, data, starts, n_starts, base_key, step0, n_steps)
        return jax.vmap(one, in_axes=(0, 0, starts_axis, starts_axis, 0))(st, models, starts, n_starts, base_keys)

    def expand(buf, actors, models, data_obs, keys, step):
        def one(buf, actor, models, key):
            nets_k, wm_k = for_seed(nets, wm, models)
            return leq.expansion(nets_k, wm_k, done_fn, args)(buf, actor, data_obs, jax.random.fold_in(key, step))
        return jax.vmap(one)(buf, actors, models, keys)
    return jax.jit(chunk, static_argnums=7, donate_argnums=0), jax.jit(expand, donate_argnums=0)


# ============================================================================================
# Settings and checks
# ============================================================================================

def check_flags(args) -> None:
    """leq.resolve's checks of --num-seeds > 1 (one line each)."""
    if args.seed + args.num_seeds > tasks.SEED_LIMIT:
        raise tasks.InputError(f"--seed {args.seed} with --num-seeds {args.num_seeds} runs seeds up to "
                               f"{args.seed + args.num_seeds - 1}, but a seed must be < 2**32")
    if args.learned_termination:
        raise tasks.InputError("--learned-termination is not supported with --num-seeds > 1 (each seed's "
                               "classifier would be a different termination); run the seeds one per process")
    for flag in ("world_model", "pretrain"):
        if getattr(args, flag) and "{seed}" not in getattr(args, flag):
            raise tasks.InputError(f"with --num-seeds > 1, --{flag.replace('_', '-')} takes a path with {{seed}} "
                                   f"in it (each seed has its own), e.g. runs/wm_s{{seed}}/world_model.npz")


def seed_args(args, seed: int, out: Path):
    """The settings of one seed, as a single-seed run in `out` would have them: its seed, the
    {seed} of --world-model / --pretrain filled in, --num-seeds 1 (recorded in its leq.npz)."""
    fill = lambda p: p.replace("{seed}", str(seed)) if p else p  # noqa: E731
    return dataclasses.replace(args, seed=seed, num_seeds=1, run_dir=str(out), world_model=fill(args.world_model),
                               pretrain=fill(args.pretrain))


def seed_resume(resume, name: str):
    """The checkpoint (path, arrays) as pretrain.upstream checks it for one seed: with that seed's inputs."""
    if not resume:
        return None
    path, f = resume
    return path, {**f, "meta/inputs": (f["meta/inputs"] or {}).get(name, {})}


def shapes(tree):
    return jax.tree.map(lambda x: (np.shape(x), str(jnp.asarray(x).dtype)), tree)


def check_alike(seeds, names) -> None:
    """The seeds can share one program: the same dataset, and world models and networks of the
    same sizes and reward transform (one line naming the first seed that differs)."""
    first = seeds[0]
    for s, name in zip(seeds[1:], names[1:]):
        if s.inputs["dataset"]["sha256"] != first.inputs["dataset"]["sha256"]:
            raise tasks.InputError(f"{name}'s dataset differs from {names[0]}'s: give every seed the same data")
        if (shapes(s.st) != shapes(first.st) or shapes(s.wm.params) != shapes(first.wm.params)
                or shapes(s.nets.stats) != shapes(first.nets.stats)):
            raise tasks.InputError(f"{name}'s world model or pretrained networks have other sizes than {names[0]}'s "
                                   f"(other --world-model-settings / --pretrain-settings?): remake them alike")
        if (s.wm.reward_scale, s.wm.reward_shift) != (first.wm.reward_scale, first.wm.reward_shift):
            raise tasks.InputError(f"{name}'s world model has another reward transform than {names[0]}'s")


# ============================================================================================
# Training
# ============================================================================================

def train(args, leq) -> Path:
    """leq.train for --num-seeds N > 1 (args resolved by leq.resolve). leq: the stage module (passed
    in: the support package never imports a stage)."""
    from tqdm import tqdm
    task, n = tasks.get_task(args.env), args.num_seeds
    run_dir = Path(args.run_dir or f"runs/{tasks.run_name(args.env)}__leq__s{args.seed}-{args.seed + n - 1}__"
                                   f"{time.strftime('%Y%m%d-%H%M%S')}")
    outs = [run_dir / f"seed_{args.seed + k}" for k in range(n)]
    configs = [seed_args(args, args.seed + k, out) for k, out in enumerate(outs)]
    names = [out.name for out in outs]
    chunk = leq.chunk_size(args)
    leq.announce(args, chunk, run_dir, f"seeds {args.seed}..{args.seed + n - 1}")
    capacity = 0 if args.no_expansion else args.expand_retain * args.expand_size * args.expand_length
    empty = leq.empty_buffer(capacity, task.obs_dim, task.act_dim)
    with artifacts.FolderLock(run_dir / "run.lock", f"run folder {run_dir}"):
        if all((out / "leq.npz").exists() for out in outs) and all(
                [artifacts.finished_run(out / "leq.npz", task, a, artifacts.LEQ_RESUME_IGNORES, run_dir) for out, a in zip(outs, configs)]):
            return run_dir
        prefixes = [name + "/" for name in names]
        resume = artifacts.newest_checkpoint(run_dir, lambda p: artifacts.read_leq_checkpoint(p, task, args, empty, prefixes))
        actor_opt, critic_opt = leq.optimizers(args)
        seeds = [Seed(*leq.setup_seed(task, a, seed_resume(resume, name), actor_opt, critic_opt))
                 for a, name in zip(configs, names)]
        check_alike(seeds, names)
        data = tasks.device_dataset(seeds[0].ds)
        st, buf, step = stack([s.st for s in seeds]), stack([empty] * n), 0
        if resume:
            loaded = [artifacts.load_leq_checkpoint(resume[1], s.st, empty, p) for s, p in zip(seeds, prefixes)]
            st, buf, step = stack([x[0] for x in loaded]), stack([x[1] for x in loaded]), loaded[0][2]
            print(f"[leq] resuming {run_dir} from step {step}")
        artifacts.write_json(run_dir / "config.json", dataclasses.asdict(args))
        for out, a in zip(outs, configs):
            artifacts.write_json(out / "config.json", dataclasses.asdict(a))  # (makes the folder too)
        logs = [artifacts.MetricsLog(out, step) for out in outs]
        stream = artifacts.MetricsLog(run_dir, step, artifacts.wandb_run(run_dir, args))

        models, k_train, k_expand = seed_models(seeds), stack([s.k_train for s in seeds]), stack([s.k_expand for s in seeds])
        train_chunk, expand = make_many(leq, seeds[0].nets, seeds[0].wm, seeds[0].done_fn, actor_opt, critic_opt, args)
        inputs = {name: s.inputs for name, s in zip(names, seeds)}

        bar = tqdm(total=args.total_steps, initial=step, desc=f"LEQ {args.env} x{n}", unit="step", mininterval=2)
        scores, t_last, saved = [float("nan")] * n, time.time(), None
        cli.STOP.armed = True  # a SIGINT/SIGTERM stops at the next chunk boundary, with a checkpoint
        while step < args.total_steps:
            if not args.no_expansion and step % args.expand_every == 0:
                buf = expand(buf, st.actor, models, data.observations, k_expand, step)
            if leq.before_chunk:
                st, data = leq.before_chunk(step, st, data)
            st, metrics, first_bad, finite = train_chunk(st, models, data, *leq.start_states(args, data, buf),
                                                         k_train, step, chunk)
            for i, name in enumerate(names):
                try:
                    artifacts.check_finite(unstack(first_bad, i), chunk, step, bool(finite[i]),
                                           (artifacts.checkpoints(run_dir) or [None])[-1])
                except FloatingPointError as e:
                    raise FloatingPointError(f"{name}: {e}") from None
            step += chunk
            now = time.time()
            rows = [{"step": step, **{k: float(v[i]) for k, v in metrics.items()}, "steps_per_s": chunk / (now - t_last)}
                    for i in range(n)]
            t_last = now
            if step % args.eval_every == 0 or step == args.total_steps:
                for i, (s, a, row) in enumerate(zip(seeds, configs, rows)):
                    result = leq.evaluate.evaluate(task, s.nets, unstack(st.actor, i), args.eval_episodes, a.seed)
                    scores[i] = result["score"]
                    row.update(score=scores[i], success=result["success"])
                t_last = time.time()  # evaluation time is not training speed
            for log, row in zip(logs, rows):
                log.log(row)
            stream.log({**{k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k != "scores"},
                        **({"score_min": float(np.min(scores)), "scores": scores} if "score" in rows[0] else {})})
            stop = cli.STOP.signum  # read once: the checkpoint and the stop below agree
            if (step % args.checkpoint_every == 0 and step < args.total_steps) or stop:
                arrays = {"progress/step": np.array(step)}
                for i, (s, p) in enumerate(zip(seeds, prefixes)):
                    arrays.update(artifacts.leq_checkpoint_arrays(unstack(st, i), unstack(buf, i), s.nets.stats, p))
                saved = artifacts.save_checkpoint(run_dir, step, arrays, "leq_checkpoint", task, args, inputs=inputs)
            bar.update(chunk)
            bar.set_postfix_str(f"critic {np.mean(metrics['critic_loss']):.3g} q {np.mean(metrics['q_data']):.3g} "
                                f"score mean {np.mean(scores):.1f} min {np.min(scores):.1f}")
            cli.stop_if_requested(f"at step {step}, saved in {saved}", stop)
        cli.STOP.armed = False
        bar.close()

        finals = [leq.finish(out, task, a, s.nets, unstack(st, i), s.inputs, log, step)["score"]
                  for i, (out, a, s, log) in enumerate(zip(outs, configs, seeds, logs))]
        stream.log({"step": step, "final_score": float(np.mean(finals)), "final_score_min": float(np.min(finals)),
                    "final_scores": finals})
    print(f"[leq] seeds {args.seed}..{args.seed + n - 1}: final score mean {np.mean(finals):.1f}, min "
          f"{np.min(finals):.1f}; {run_dir}/seed_<seed>/")
    return run_dir
