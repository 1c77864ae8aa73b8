"""Train the goal-reaching ant ("walker") that makes the built-in AntMaze data (issue 37).

    python scripts/train_ant_walker.py                          # -> data/ant_walker.npz (about 90 min on 2 cores)
    python scripts/train_ant_walker.py --total-steps 20000 --eval-every 10000 \
        --run-dir runs/walker_quick --out runs/walker_quick/installed.npz               # a quick look

D4RL made its AntMaze datasets with a goal-reaching ant policy trained by RL and steered along
waypoints. This is that policy's trainer: soft actor-critic (SAC: two critics with a clipped
double-Q target, a tanh-Gaussian actor, a learned entropy temperature) on N ants of D4RL AntMaze's
body (Ant-v5's legs with D4RL's motors and 0.1 s steps) walking on an open floor to random goals
(leq_utils/ant.py: `GoalAnts`, its reward and what the walker sees). It is a tool for making data, not part of LEQ.

Each iteration steps the N ants once (one jitted actor call) and then does N gradient steps in
one jitted `lax.scan` on a replay buffer that lives on the device. Every `--eval-every` steps it
measures the walker the way issue 37 asks (`leq_utils.ant.reach_trials`: from a fresh start, a
goal 4-8 units away, reached within 100 steps). A run resumes exactly from its newest checkpoint
in the run folder (networks, optimiser, replay buffer, the ants' MuJoCo states and the random
generator); a finished run goes on from its last checkpoint when given a larger `--total-steps`.
The final artifact (`<run dir>/walker.npz`, copied to `--out`, by default data/ant_walker.npz,
where the AntMaze generator looks before it takes the project's own leq_utils/ant_walker.npz)
holds the actor and its measured reach rate.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import NamedTuple, Optional

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from leq_utils import ant, artifacts, cli  # noqa: E402
from leq_utils.common import InputError, check_common, check_flags, check_writable_folder  # noqa: E402

KIND, WALKER = ant.WALKER_KIND, ant.WALKER_TASK  # what the artifacts record
RESUME_IGNORES = ("total_steps", "out", "run_dir")  # a run may be extended, and its artifact written elsewhere


@dataclasses.dataclass
class Args:
    seed: int = 0
    """random seed (networks, ants, goals)"""
    run_dir: Optional[str] = None
    """run folder (default runs/ant_walker_d4rl__s<seed>, the body in its name): checkpoints and metrics.jsonl"""
    out: Optional[str] = None
    """where the finished walker is copied (default: <$LEQ_DATA_DIR or ./data>/ant_walker.npz, where the AntMaze
    generator looks before it takes the project's own, leq_utils/ant_walker.npz); the run folder keeps its own walker.npz"""
    total_steps: int = 1_000_000
    """environment steps, all ants together"""
    num_envs: int = 8
    """ants stepped together; each iteration then does num_envs gradient steps"""
    start_steps: int = 10_000
    """uniformly random actions before the actor acts"""
    buffer_size: int = 1_000_000
    """replay buffer rows (on the device)"""
    batch_size: int = 256
    """minibatch per gradient step"""
    hidden_dims: tuple = (256, 256)
    """hidden layers of the actor and of each critic"""
    lr: float = 3e-4
    """Adam learning rate of the actor, the critics and the temperature"""
    gamma: float = 0.99
    """discount"""
    tau: float = 0.005
    """target critics' Polyak rate"""
    max_steps: int = 300
    """an ant's episode length before it restarts (goals are replaced when reached)"""
    goal_min: float = 1.0
    """nearest training goal (units)"""
    goal_max: float = 8.0
    """farthest training goal (units)"""
    upside_down_falls: bool = False
    """also end an ant's episode, as a fall, when it turns over on its back (the height rule alone does not).
    On Ant-v5's strong-motored body (data v1) a walker trained with it left more ants on their backs in the maze
    data, not fewer (31% against 25%): docs/TASKS.md"""
    eval_every: int = 50_000
    """steps between reach measurements (and checkpoints)"""
    eval_trials: int = 100
    """trials per reach measurement"""


def check_args(args: Args) -> None:
    check_common(args)
    check_flags(args, (">= 1", "total_steps num_envs batch_size buffer_size max_steps eval_every eval_trials"),
                (">= 1", "hidden_dims"), (">= 0", "start_steps"), ("in (0, 1)", "gamma"), ("in (0, 1]", "tau"))
    if not (args.lr > 0 and args.goal_min > ant.REACH_RADIUS):
        raise InputError(f"--lr must be > 0 and --goal-min > the reach radius {ant.REACH_RADIUS} "
                         f"(got {args.lr}, {args.goal_min})")
    if args.goal_max < args.goal_min:
        raise InputError(f"--goal-max ({args.goal_max}) must be at least --goal-min ({args.goal_min})")
    if args.buffer_size < args.num_envs:
        raise InputError(f"--buffer-size ({args.buffer_size}) must hold one iteration ({args.num_envs} rows)")


# ============================================================================================
# Networks: tanh-Gaussian actor (leq_utils/ant.walker_actor), two critics (stacked), temperature
# ============================================================================================

class Critic(nn.Module):
    hidden_dims: tuple

    @nn.compact
    def __call__(self, obs, act):
        x = jnp.concatenate([obs, act], -1)
        for h in self.hidden_dims:
            x = nn.relu(nn.Dense(h)(x))
        return nn.Dense(1)(x)[..., 0]


def sample_action(actor, params, obs, key):
    """a = tanh(mean + std eps) and log pi(a | s) (the tanh change of variables, stable form)."""
    mean, log_std = actor.apply(params, obs)
    eps = jax.random.normal(key, mean.shape)
    z = mean + jnp.exp(log_std) * eps
    log_det = 2.0 * (jnp.log(2.0) - z - jax.nn.softplus(-2.0 * z))  # log(1 - tanh(z)^2)
    log_prob = jnp.sum(-0.5 * eps ** 2 - log_std - 0.5 * jnp.log(2 * jnp.pi) - log_det, -1)
    return jnp.tanh(z), log_prob


class SACState(NamedTuple):
    actor: dict
    critics: dict          # two critics, stacked on a leading axis
    targets: dict
    log_alpha: jnp.ndarray
    actor_opt: tuple
    critic_opt: tuple
    alpha_opt: tuple


class Replay(NamedTuple):
    obs: jnp.ndarray
    act: jnp.ndarray
    rew: jnp.ndarray
    next_obs: jnp.ndarray
    mask: jnp.ndarray      # 0 where the ant fell (terminal), else 1 (a cut-off episode bootstraps)
    ptr: jnp.ndarray
    filled: jnp.ndarray


def empty_replay(capacity: int) -> Replay:
    z = jnp.zeros
    d = ant.WALKER_OBS_DIM
    return Replay(z((capacity, d)), z((capacity, ant.ACT_DIM)), z(capacity), z((capacity, d)), z(capacity),
                  jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))


def replay_add(buf: Replay, obs, act, rew, next_obs, mask) -> Replay:
    """Write the rows at ptr, wrapping around (a FIFO ring)."""
    n, capacity = obs.shape[0], buf.obs.shape[0]
    rows = (buf.ptr + jnp.arange(n)) % capacity
    put = lambda old, new: old.at[rows].set(new)  # noqa: E731
    return Replay(put(buf.obs, obs), put(buf.act, act), put(buf.rew, rew), put(buf.next_obs, next_obs),
                  put(buf.mask, mask), (buf.ptr + n) % capacity, jnp.minimum(buf.filled + n, capacity))


def make_sac(args: Args):
    actor, critic = ant.walker_actor(args.hidden_dims), Critic(tuple(args.hidden_dims))
    opt = optax.adam(args.lr)
    target_entropy = -float(ant.ACT_DIM)
    q_both = jax.vmap(critic.apply, in_axes=(0, None, None))  # (2, B)

    def init(key) -> SACState:
        k_actor, k_critic = jax.random.split(key)
        obs, act = jnp.zeros((1, ant.WALKER_OBS_DIM)), jnp.zeros((1, ant.ACT_DIM))
        actor_params = actor.init(k_actor, obs)
        critics = jax.vmap(lambda k: critic.init(k, obs, act))(jax.random.split(k_critic, 2))
        log_alpha = jnp.zeros(())
        return SACState(actor_params, critics, critics, log_alpha, opt.init(actor_params), opt.init(critics),
                        opt.init(log_alpha))

    def update(st: SACState, b: Replay, key):
        k_next, k_pi = jax.random.split(key)
        alpha = jnp.exp(st.log_alpha)
        # critics: r + gamma mask (min_i Q'_i(s', a') - alpha log pi(a' | s')), a' ~ pi(s')
        a2, logp2 = sample_action(actor, st.actor, b.next_obs, k_next)
        target = b.rew + args.gamma * b.mask * (jnp.min(q_both(st.targets, b.next_obs, a2), 0) - alpha * logp2)
        target = jax.lax.stop_gradient(target)

        def critic_loss(critics):
            q = q_both(critics, b.obs, b.act)
            return jnp.mean(jnp.sum((q - target) ** 2, 0)), jnp.mean(q)

        (c_loss, q_mean), g = jax.value_and_grad(critic_loss, has_aux=True)(st.critics)
        upd, critic_opt = opt.update(g, st.critic_opt, st.critics)
        critics = optax.apply_updates(st.critics, upd)

        # actor: alpha log pi(a | s) - min_i Q_i(s, a), a ~ pi(s) (reparameterised), with the new critics
        def actor_loss(params):
            a, logp = sample_action(actor, params, b.obs, k_pi)
            return jnp.mean(alpha * logp - jnp.min(q_both(critics, b.obs, a), 0)), logp

        (a_loss, logp), g = jax.value_and_grad(actor_loss, has_aux=True)(st.actor)
        upd, actor_opt = opt.update(g, st.actor_opt, st.actor)
        actor_params = optax.apply_updates(st.actor, upd)

        # temperature: -log_alpha (log pi + target entropy)
        entropy_gap = jax.lax.stop_gradient(jnp.mean(logp) + target_entropy)
        g_alpha = -entropy_gap
        upd, alpha_opt = opt.update(g_alpha, st.alpha_opt, st.log_alpha)
        log_alpha = optax.apply_updates(st.log_alpha, upd)

        targets = jax.tree.map(lambda t, p: (1 - args.tau) * t + args.tau * p, st.targets, critics)
        metrics = {"critic_loss": c_loss, "actor_loss": a_loss, "q": q_mean, "alpha": alpha, "entropy": -jnp.mean(logp)}
        return SACState(actor_params, critics, targets, log_alpha, actor_opt, critic_opt, alpha_opt), metrics

    @jax.jit
    def train(st: SACState, buf: Replay, key, n_updates_key_base):
        """args.num_envs gradient steps (lax.scan), minibatches drawn uniformly from the filled rows."""
        def body(st, k):
            k_rows, k_update = jax.random.split(k)
            rows = jax.random.randint(k_rows, (args.batch_size,), 0, buf.filled)
            b = jax.tree.map(lambda x: x[rows], buf._replace(ptr=None, filled=None))
            return update(st, b, k_update)
        st, metrics = jax.lax.scan(body, st, jax.random.split(jax.random.fold_in(key, n_updates_key_base), args.num_envs))
        return st, jax.tree.map(jnp.mean, metrics)

    @jax.jit
    def explore(params, obs, key):
        return sample_action(actor, params, obs, key)[0]

    @jax.jit
    def deterministic(params, obs):
        return jnp.tanh(actor.apply(params, obs)[0])

    return init, train, explore, deterministic, jax.jit(replay_add, donate_argnums=0)


# ============================================================================================
# Checkpoints: everything a run needs to go on exactly
# ============================================================================================

def ants_arrays(ants: ant.GoalAnts) -> dict:
    import mujoco
    spec = mujoco.mjtState.mjSTATE_INTEGRATION
    states = np.stack([_get_state(mujoco, ants.model, d, spec) for d in ants.data])
    return {"ants/mj_state": states, "ants/goals": ants.goals, "ants/steps": ants.steps, "ants/states": ants.states,
            "ants/rng": np.array(json.dumps(ants.rng.bit_generator.state))}


def _get_state(mujoco, model, data, spec):
    x = np.empty(mujoco.mj_stateSize(model, spec))
    mujoco.mj_getState(model, data, x, spec)
    return x


def restore_ants(ants: ant.GoalAnts, f: dict) -> None:
    import mujoco
    spec = mujoco.mjtState.mjSTATE_INTEGRATION
    for d, x in zip(ants.data, f["ants/mj_state"]):
        mujoco.mj_setState(ants.model, d, x, spec)
        mujoco.mj_forward(ants.model, d)
    ants.goals[:], ants.steps[:], ants.states[:] = f["ants/goals"], f["ants/steps"], f["ants/states"]
    ants.rng.bit_generator.state = json.loads(str(f["ants/rng"]))


ANTS_KEYS = ("ants/mj_state", "ants/goals", "ants/steps", "ants/states", "ants/rng", "step")


def read_walker_checkpoint(path, args: Args, st_template, empty: Replay, ants: ant.GoalAnts):
    """(SAC state, replay buffer, arrays) of a checkpoint, every part checked against this
    configuration: a damaged one is CorruptArtifact (newest_checkpoint then tries the one before)."""
    import mujoco
    f = artifacts.read_checkpoint(path, WALKER, KIND, args, RESUME_IGNORES)
    missing = [k for k in ANTS_KEYS if k not in f]
    if missing:
        raise artifacts.CorruptArtifact(f"checkpoint {path} lacks {', '.join(missing)}")
    size = mujoco.mj_stateSize(ants.model, mujoco.mjtState.mjSTATE_INTEGRATION)
    if f["ants/mj_state"].shape != (args.num_envs, size) or f["ants/goals"].shape != (args.num_envs, 2):
        raise artifacts.CorruptArtifact(f"checkpoint {path}: its ants' states have shape {f['ants/mj_state'].shape}, "
                                        f"not {(args.num_envs, size)}")
    artifacts.check_rows(empty, f, path, "replay")
    return artifacts.tree_from_arrays(st_template, f, "sac"), artifacts.rows_from_arrays(empty, f, "replay"), f


def install(final: Path, out: Path) -> None:
    """Copy the run's walker.npz to --out (atomically), where the AntMaze generator finds it."""
    if out.resolve() != final.resolve():
        data = final.read_bytes()
        artifacts.atomic_write(out, lambda f: f.write(data))
        print(f"[walker] installed {final} as {out}")


def save_walker(path: Path, args: Args, actor_params, summary: dict) -> None:
    arrays = {**artifacts.tree_arrays(actor_params, "actor"),
              **{f"summary/{k}": np.asarray(v) for k, v in summary.items() if np.isfinite(v)}}  # no mean steps if none reached
    artifacts.save_npz(path, arrays, KIND, WALKER, args)


# ============================================================================================
# Main
# ============================================================================================

MEASURED = ("reach_rate", "fall_rate", "upside_down_rate", "mean_steps_to_reach")  # logged, and stored in the artifact


def measure(deterministic, params, args: Args, seed: int) -> dict:
    """Issue 37's measure of the walker (ant.reach_trials), the figures in MEASURED."""
    result = ant.reach_trials(lambda obs: np.asarray(deterministic(params, jnp.asarray(obs))), args.eval_trials,
                              seed, distance=(4.0, 8.0), steps=100)
    return {k: result[k] for k in MEASURED}


def train(args: Args) -> Path:
    from tqdm import tqdm
    check_args(args)
    run_dir = Path(args.run_dir or f"runs/ant_walker_{ant.BODY}__s{args.seed}")
    out = Path(args.out) if args.out else ant.trained_walker_path()
    check_writable_folder(out.parent, "the walker's folder (--out, or $LEQ_DATA_DIR)")
    iters_per_chunk = max(1, args.eval_every // args.num_envs)
    chunk_steps = iters_per_chunk * args.num_envs   # evaluation and checkpoint boundary, in env steps
    with artifacts.FolderLock(run_dir / "run.lock", f"run folder {run_dir}"):
        final = run_dir / "walker.npz"  # the run's own artifact; --out gets a copy of it
        try:  # a finished run of at least these steps; one of fewer steps goes on (the run is extended)
            done = final.exists() and int(artifacts.recorded_config(final).get("total_steps", 0)) >= args.total_steps
        except Exception:  # unreadable: finished_run moves it aside (or says what to do)
            done = True
        if done and artifacts.finished_run(final, WALKER, args, RESUME_IGNORES, checkpoint_dir=run_dir):
            install(final, out)
            return run_dir
        init, train_step, explore, deterministic, add = make_sac(args)
        key = jax.random.PRNGKey(args.seed)
        k_init, k_act, k_train = jax.random.split(key, 3)
        st, buf = init(k_init), empty_replay(args.buffer_size)
        ants = ant.GoalAnts(args.num_envs, args.seed, goal_distance=(args.goal_min, args.goal_max), max_steps=args.max_steps,
                            upside_down_falls=args.upside_down_falls)
        step = 0
        resume = artifacts.newest_checkpoint(run_dir, lambda p: read_walker_checkpoint(p, args, st, buf, ants))
        if resume:
            st, buf, f = resume[1]
            restore_ants(ants, f)
            step = int(f["step"])
            print(f"[walker] resuming {run_dir} from step {step}")
        metrics_log = artifacts.MetricsLog(run_dir, step, None)
        bar = tqdm(total=args.total_steps, initial=step, desc="ant walker", unit="step", mininterval=2)
        obs = ants.observe()
        cli.STOP.armed = True
        result, t0 = {}, time.time()
        while step < args.total_steps:
            sums, n_updates, episode_reward, step0 = {}, 0, [], step
            for _ in range(iters_per_chunk):
                if step >= args.total_steps:
                    break
                k = jax.random.fold_in(k_act, step)
                if step < args.start_steps:
                    act = np.asarray(jax.random.uniform(k, (args.num_envs, ant.ACT_DIM), minval=-1.0, maxval=1.0))
                else:
                    act = np.asarray(explore(st.actor, jnp.asarray(obs), k))
                next_obs_reset, rew, terminated, truncated, reached, next_obs = ants.step(act)
                buf = add(buf, jnp.asarray(obs), jnp.asarray(act), jnp.asarray(rew), jnp.asarray(next_obs),
                          jnp.asarray(1.0 - terminated, jnp.float32))
                obs = next_obs_reset
                episode_reward.append(rew.mean())
                step += args.num_envs
                if step >= max(args.start_steps, args.batch_size):
                    st, m = train_step(st, buf, k_train, step)
                    for name, v in m.items():
                        sums[name] = sums.get(name, 0.0) + float(v)
                    n_updates += 1
            row = {"step": step, "reward_per_step": float(np.mean(episode_reward)),
                   **{k: v / max(n_updates, 1) for k, v in sums.items()}, "steps_per_s": (step - step0) / (time.time() - t0)}
            if step % chunk_steps == 0 or step >= args.total_steps:
                result = measure(deterministic, st.actor, args, seed=10_000 + args.seed)
                row.update(result)
            metrics_log.log(row)
            stop = cli.STOP.signum
            # every chunk, the last one too: a finished run can be extended with a larger --total-steps
            artifacts.save_checkpoint(run_dir, step, {**artifacts.tree_arrays(st, "sac"), **artifacts.rows_arrays(buf, "replay"),
                                                      **ants_arrays(ants), "step": np.asarray(step)}, KIND, WALKER, args)
            bar.update(step - bar.n)
            bar.set_postfix_str(f"reach {result.get('reach_rate', float('nan')):.2f} q {row.get('q', float('nan')):.3g}")
            cli.stop_if_requested(f"at step {step}, saved in {artifacts.checkpoints(run_dir)[-1]}", stop)
            t0 = time.time()
        cli.STOP.armed = False
        bar.close()
        result = measure(deterministic, st.actor, args, seed=20_000 + args.seed)  # fresh trials for the record
        save_walker(final, args, st.actor, {**result, "steps": step, "final_score": 100 * result["reach_rate"]})
        print(f"[walker] reach rate {result['reach_rate']:.2f} (goals 4-8 units away, <= 100 steps, "
              f"{args.eval_trials} trials), falls {result['fall_rate']:.2f}, on its back "
              f"{result['upside_down_rate']:.2f}; wrote {final}")
        install(final, out)
    return run_dir


if __name__ == "__main__":
    cli.run_script(train, Args)
