"""Stage 3: Lower Expectile Q-learning (docs/ALGORITHM.md, sections 5 and 7).

    python leq.py --env pointmaze-umaze
    python leq.py --env antmaze-ultra-diverse-v0   # the paper's settings; needs the d4rl extra

Starts from the BC actor and FQE critic of pretrain.py and the world model of world_model.py
(running those stages first when their artifacts are missing, with the settings given as
--world-model-settings.* and --pretrain-settings.*, by default their own defaults). Every
gradient step: imagine H steps from expansion-buffer states, form lambda-returns, update the
actor with the lower-expectile lambda-return surrogate (old critic), update the critic with
the lower-expectile loss on lambda-returns plus the Bellman loss on data plus the EMA
regulariser (old actor), then the EMA critic. Every 5000 steps the dataset is expanded with
noisy 5-step model rollouts. Writes runs/<run>/leq.npz, metrics.jsonl and checkpoints.

Reading order (one LEQ gradient step, top to bottom): Args -> the model step it imagines with
(world_model.py) -> imagination -> lambda-returns -> the per-step action gradients D_t = dG_t/da_t
-> the critic loss -> the actor surrogate -> the update and its lax.scan -> dataset expansion ->
main. The actor and the critic are pretrain.py's. The ablations of docs/ALGORITHM.md, section 7
are small branches at named points; the ones that need more (MOBILE's penalty, N critics, the
stochastic actor) are the functions of the "Ablations" section, plus `Variant` and its noise
(imagination), `entropy_bonus_loss` (actor surrogate) and `variant_of` (update). Checkpoints and everything
imported from `leq_utils` are plumbing (TRY NOT TO MODIFY).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Annotated, Literal, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro

import evaluate
import pretrain
import world_model
from pretrain import Nets
from leq_utils import artifacts, cli, many_seeds, tasks, upstream  # support package: data, artifacts, CLI (TRY NOT TO MODIFY)


# Per-task defaults for the built-in tasks (D4RL tasks keep the paper's settings):
# (total steps, evaluation interval, expectile tau); tau 0.1 is the paper's first choice. Measured
# (docs/RESULTS.md): umaze and medium reach 100% at their first evaluation (5k) and stay there;
# large: 25k steps, where its 3 measured seeds ended at 100%, 100%, 100% (40k-step runs of the same
# seeds ended at 100%, 52%, 48%: two fell back after 25k to a wall the world model lets the point
# pass at speed); ultra: the 50k steps of its 3 measured seeds (each on its plateau from 40k on;
# 100%, 100%, 79% in the final 10 x 10).
BUILTIN = {"pointmaze-umaze": (30_000, 5_000, 0.1), "pointmaze-medium": (15_000, 5_000, 0.1),
           "pointmaze-large": (25_000, 5_000, 0.1), "pointmaze-ultra": (50_000, 5_000, 0.1)}


# The upstream stages' hyperparameters, nested in Args (whose fields `world_model` and `pretrain`
# hide the module names inside the class body).
WorldModelSettings, PretrainSettings = world_model.Settings, pretrain.Settings


@dataclasses.dataclass
class Args(tasks.TaskArgs):
    # --- Experiment (and --env, --dataset-path, --data-dir, --seed: tasks.TaskArgs) ---
    num_seeds: int = 1
    """train seeds seed .. seed + num_seeds - 1 in one process (vmapped), each with its own upstream
    artifacts (--world-model/--pretrain: a path with {seed} in it), each in <run_dir>/seed_<seed>/"""
    world_model: Optional[str] = None
    """world_model.npz (default: runs/<env>__world_model__s<seed>/, trained first if missing)"""
    pretrain: Optional[str] = None
    """pretrain.npz (default: runs/<env>__pretrain__s<seed>/, trained first if missing)"""
    run_dir: Optional[str] = None
    """output folder (default: runs/<env>__leq__s<seed>__<time>); a folder with a checkpoint resumes"""
    track: bool = False
    """log to Weights & Biases"""
    wandb_project: str = "leq"
    """W&B project name"""
    # --- The upstream stages leq.py runs when their artifacts are missing ---
    world_model_settings: WorldModelSettings = dataclasses.field(default_factory=WorldModelSettings)
    """settings of the world model trained when none exists (as world_model.py's flags)"""
    pretrain_settings: PretrainSettings = dataclasses.field(default_factory=PretrainSettings)
    """settings of the BC + FQE pretraining run when no pretrain.npz exists (as pretrain.py's flags)"""
    # --- LEQ ---
    expectile: Annotated[Optional[float], tyro.conf.arg(help_behavior_hint="", help=tasks.per_task_help(
        "tau of the lower expectile", BUILTIN, 2, "0.1, the paper's first choice"))] = None
    gamma: float = 0.997
    """discount factor"""
    lam: float = 0.95
    """lambda of the lambda-returns"""
    horizon: int = 10
    """imagination length H"""
    beta: float = 0.25
    """weight of the model (imagination) loss against the data loss"""
    batch_size: int = 256
    """dataset transitions per step (B_D)"""
    model_batch_size: int = 256
    """imagination start states per step (B_M)"""
    actor_lr: float = 3e-5
    """actor Adam learning rate (cosine-decayed to 0 over the run)"""
    critic_lr: float = 1e-4
    """critic Adam learning rate"""
    ema_decay: float = 0.995
    """decay of the critic's EMA copy"""
    ema_weight: float = 1.0
    """weight of the EMA regulariser"""
    total_steps: Annotated[Optional[int], tyro.conf.arg(help_behavior_hint="", help=tasks.per_task_help(
        "gradient steps", BUILTIN, 0, "1,000,000 as the paper"))] = None
    independent_rollouts: bool = True
    """draw the actor's and the critic's imagined rollouts with different model samples (as released)"""
    goal: Optional[tuple[float, float]] = None
    """maze tasks: override the termination centre used in imagination"""
    # --- Dataset expansion ---
    expand_every: int = 5000
    """steps between expansions (paper 5000; the release's flag default is 1000)"""
    expand_size: int = 50_000
    """dataset states rolled out per expansion"""
    expand_length: int = 5
    """rollout length of an expansion"""
    expand_noise: float = 1.0
    """std of the Gaussian noise added to the actor's mean before tanh"""
    expand_retain: int = 5
    """expansions kept in the FIFO buffer"""
    # --- Ablations (docs/ALGORITHM.md, section 7) ---
    critic_target: Literal["lambda", "hstep", "1step"] = "lambda"
    """critic target on imagined states: lambda-return, H-step return or 1-step return"""
    actor_objective: Literal["lambda", "hstep", "q"] = "lambda"
    """actor objective: lambda-return, H-step return (both lower-expectile weighted) or Q(s, a)"""
    no_ema: bool = False
    """drop the EMA regulariser"""
    no_expansion: bool = False
    """no dataset expansion: imagination starts from dataset states"""
    no_data_loss: bool = False
    """drop the Bellman loss on dataset transitions"""
    data_expectile: bool = False
    """use the expectile weight |tau - 1(y < Q)| on the data loss too (instead of 1/2)"""
    no_pretrain: bool = False
    """start from randomly initialised actor and critic instead of BC/FQE"""
    action_grad: Literal["adjoint", "jacobian"] = "adjoint"
    """dG_t/da_t by one backward sweep, or by the release's full Jacobian (same numbers, slower)"""
    conservatism: Literal["expectile", "mobile"] = "expectile"
    """LEQ's lower expectile, or MOBILE's penalty (Tables 5/6): imagined rewards r_t - beta u(s_t, a_t),
    u = std over the elites of Q(s'_i, pi(s'_i)), and plain squared error (expectile 1/2)"""
    mobile_beta: float = 0.1
    """MOBILE's penalty coefficient beta (0.1: the release's default; the paper's grid is lost)"""
    num_critics: Optional[int] = None
    """critics whose minimum is every Q (default: 1; 2 with --conservatism mobile, MOBILE's); the
    extra ones start fresh"""
    policy: Literal["deterministic", "stochastic"] = "deterministic"
    """LEQ's tanh(mean), or a tanh-Gaussian with a learned state-dependent log-std, sampled
    (reparameterised) in imagination and expansion, with an entropy bonus (Table 21); evaluation: tanh(mean)"""
    entropy_coef: float = 0.1
    """stochastic policy: alpha of the entropy bonus alpha sum_t log pi(a_t | s_t) in the actor loss"""
    init_log_std: float = 0.0
    """stochastic policy: the log-std at the start (0: sigma 1, the noise LEQ's expansion adds)"""
    learned_termination: bool = False
    """imagine and expand with the world model's termination classifier instead of the task's true
    termination (Table 22; add one with world_model.py --termination-only)"""
    # --- Evaluation, logging, checkpoints ---
    eval_every: Annotated[Optional[int], tyro.conf.arg(help_behavior_hint="", help=tasks.per_task_help(
        "steps between evaluations", BUILTIN, 1, "50,000 as the paper"))] = None
    eval_episodes: int = 10
    """episodes per periodic evaluation"""
    final_eval_rounds: int = 10
    """final evaluation: this many rounds of eval_episodes (paper: 10 x 10)"""
    checkpoint_every: Optional[int] = None
    """steps between checkpoints (default: the evaluation interval); the last two are kept"""
    chunk: int = 1000
    """gradient steps fused into one jitted call (lax.scan); aligned to the intervals above"""


# Tests only, never a flag: a function (step, state, data) -> (state, data) that train() calls
# before each chunk (a test sets it in a subprocess, e.g. to poison the data and hit the NaN guard).
before_chunk = None


def resolve(args: Args) -> Args:
    """Fill per-task defaults and check the flags; one-line errors for values out of range."""
    tasks.check_task_args(args)
    steps, every, tau = BUILTIN.get(args.env, (1_000_000, 50_000, 0.1))
    args = dataclasses.replace(
        args, total_steps=steps if args.total_steps is None else args.total_steps,
        eval_every=every if args.eval_every is None else args.eval_every,
        expectile=tau if args.expectile is None else args.expectile)
    if args.checkpoint_every is None:
        args = dataclasses.replace(args, checkpoint_every=args.eval_every)
    if args.num_critics is None:
        args = dataclasses.replace(args, num_critics=2 if args.conservatism == "mobile" else 1)
    tasks.check_flags(args, ("in (0, 1)", "expectile"), ("in (0, 1]", "gamma"), ("in [0, 1]", "lam beta ema_decay"),
                      (">= 1", "num_seeds num_critics horizon batch_size model_batch_size chunk eval_episodes final_eval_rounds expand_every "
                               "expand_size expand_length expand_retain eval_every checkpoint_every"),
                      (">= 0", "mobile_beta entropy_coef total_steps actor_lr critic_lr ema_weight expand_noise"))
    if args.num_seeds > 1:
        many_seeds.check_flags(args)
    if args.learned_termination and args.goal:
        raise tasks.InputError("--goal sets the true termination's centre: it has no effect with "
                               "--learned-termination; drop one of them")
    return args


# ============================================================================================
# The model step LEQ imagines with (world_model.py)
# ============================================================================================

# LEQ imagines with world_model.py's step: (s, a) -> (s', r, done), one uniformly drawn elite per
# sample, reparameterised (s' and r are differentiable in s and a), done from the task's TRUE
# termination function (tasks.termination_fn; the learned classifier with --learned-termination)
# with no gradient. `model_noise` draws the randomness of
# a step (the elite and the Gaussian noise), `model_step_given` is the step for given randomness.
from world_model import ModelNoise, WorldModel, model_noise, model_step, model_step_given  # noqa: E402,F401


# ============================================================================================
# Imagination: H model steps with the actor from start states (docs/ALGORITHM.md, section 5.2)
# ============================================================================================

class Variant(NamedTuple):
    """What the ablations of Tables 5/6 and 21 change in an imagined step (the defaults: LEQ)."""
    stochastic: bool = False         # a_t = tanh(mu(s_t) + sigma(s_t) eps_t), eps_t ~ N(0, I), not tanh(mu(s_t))
    penalty: Optional[float] = None  # MOBILE's beta_M (--mobile-beta): the reward is r_t - beta_M u(s_t, a_t)


class Rollout(NamedTuple):
    states: jnp.ndarray   # (H + 1, B, obs)   s_0 .. s_H
    actions: jnp.ndarray  # (H + 1, B, act)   a_t = pi(s_t) (the stochastic actor: its sample)
    rewards: jnp.ndarray  # (H, B)            r_t (transformed; with MOBILE's penalty r_t - beta u_t)
    dones: jnp.ndarray    # (H, B)            done_t = T(s_t, a_t, s_{t+1})
    noise: ModelNoise  # the model's randomness per step: member (H, B), eps (H, B, obs + 1)
    policy_eps: Optional[jnp.ndarray] = None   # (H + 1, B, act) the stochastic actor's eps_t
    penalty_eps: Optional[jnp.ndarray] = None  # (H, E, B, obs) MOBILE's next-state noise of each elite
    penalties: Optional[jnp.ndarray] = None    # (H, B) MOBILE's u_t


def at(x, t):
    """x[t], or None when that optional noise is absent (no ablation uses it)."""
    return None if x is None else x[t]


def policy_noise(key, shape):
    """The stochastic actor's eps ~ N(0, I) (one function, so that a test can set it to 0)."""
    return jax.random.normal(key, shape)


def variant_noise(wm: WorldModel, key, s0, horizon, act_dim, variant: Variant):
    """The randomness an ablation adds to a rollout: the stochastic actor's eps_t (H + 1, B, act)
    and MOBILE's per-elite next-state noise (H, E, B, obs). Both come from keys folded out of the
    rollout's key, so LEQ's own draws are unchanged and a resumed run draws the same numbers."""
    batch, obs_dim = s0.shape
    n_elites = len(world_model.members(wm.params))
    policy = policy_noise(jax.random.fold_in(key, 1), (horizon + 1, batch, act_dim)) if variant.stochastic else None
    penalty = (None if variant.penalty is None else
               jax.random.normal(jax.random.fold_in(key, 2), (horizon, n_elites, batch, obs_dim)))
    return policy, penalty


def imagined_step(nets: Nets, actor, critic, wm, done_fn, s, a, member, eps, penalty_eps, variant: Variant):
    """(s', r, done, u) of one model step; with MOBILE's penalty r is r_t - beta_M u(s, a) (u is
    None without it; mobile_uncertainty is in the "Ablations" section below)."""
    s2, r, done = model_step_given(wm, s, a, member, eps, done_fn)
    if variant.penalty is None:
        return s2, r, done, None
    u = mobile_uncertainty(nets, actor, critic, wm, s, a, penalty_eps)
    return s2, r - variant.penalty * u, done, u


def imagine(nets: Nets, actor, wm: WorldModel, done_fn, s0, key, horizon, critic=None,
            variant: Variant = Variant()) -> Rollout:
    """H steps from s0 with the actor (deterministic; or sampled, with the stochastic ablation)
    and one random elite per sample per step. MOBILE's penalty needs the critic."""
    noise = model_noise(wm, key, (horizon, s0.shape[0]))
    policy_eps, penalty_eps = variant_noise(wm, key, s0, horizon, nets.actor.act_dim, variant)

    def step(s, xs):
        (member, eps), eps_t, penalty_t = xs
        a = nets.act(actor, s, eps_t)
        s2, r, done, u = imagined_step(nets, actor, critic, wm, done_fn, s, a, member, eps, penalty_t, variant)
        return s2, (s, a, r, done, u)

    xs = (noise, None if policy_eps is None else policy_eps[:-1], penalty_eps)
    s_H, (states, actions, rewards, dones, u) = jax.lax.scan(step, s0, xs, unroll=True)
    states = jnp.concatenate([states, s_H[None]])
    actions = jnp.concatenate([actions, nets.act(actor, s_H, at(policy_eps, -1))[None]])
    return Rollout(states, actions, rewards, dones.astype(s0.dtype), noise, policy_eps, penalty_eps, u)


def alive_masks(dones):
    """m_0 = 1, m_{t+1} = m_t (1 - done_t): (H + 1, B)."""
    masks = [jnp.ones_like(dones[0])]
    for done in dones:
        masks.append(masks[-1] * (1.0 - done))
    return jnp.stack(masks)


# ============================================================================================
# Lambda-returns (docs/ALGORITHM.md, section 5.3) and the ablations' other returns
# ============================================================================================

def return_coefficients(kind: str, horizon: int, lam: float):
    """Coefficients of the recursion G_t = al_t q_t + bp_t (m_t r_t + gamma m_{t+1} G_{t+1}),
    G_H = q_H, for t = 0..H-1:
      lambda (the paper's variant, with the 0-step term q_t): c_{H-1} = 1, c_{t-1} = 1 + lam c_t,
        al_t = 1 / (1 + lam c_t), bp_t = lam c_t / (1 + lam c_t)
        <=> G_t = sum_{n=0}^{H-t} lam^n Q^(n)_t / sum_{n=0}^{H-t} lam^n
      hstep: al_t = 0, bp_t = 1  (G_t = Q^(H-t)_t, bootstrapped with q_H)
      q:     al_t = 1, bp_t = 0  (G_t = q_t)"""
    if kind == "lambda":
        c = np.array([sum(lam ** k for k in range(horizon - t)) for t in range(horizon)])
        return 1.0 / (1.0 + lam * c), lam * c / (1.0 + lam * c)
    if kind == "hstep":
        return np.zeros(horizon), np.ones(horizon)
    if kind == "q":
        return np.ones(horizon), np.zeros(horizon)
    raise ValueError(kind)


def returns(q, rewards, masks, coefficients, gamma):
    """The recursion of `return_coefficients` for q (H + 1, B), rewards (H, B), masks (H + 1, B)."""
    al, bp = coefficients
    horizon = rewards.shape[0]
    G = [q[horizon]]
    for t in reversed(range(horizon)):
        G.append(al[t] * q[t] + bp[t] * (masks[t] * rewards[t] + gamma * masks[t + 1] * G[-1]))
    return jnp.stack(G[::-1])


def lambda_returns(q, rewards, masks, gamma, lam):
    """docs/ALGORITHM.md, section 5: G_t = (q_t + lam c_t (m_t r_t + gamma m_{t+1} G_{t+1})) / (1 + lam c_t).
    The equation's own entry point (the tests call it); training calls
    returns(..., return_coefficients(kind, H, lam), gamma), which is this for kind "lambda"."""
    return returns(q, rewards, masks, return_coefficients("lambda", rewards.shape[0], lam), gamma)


def one_step_targets(q, rewards, masks, gamma):
    """The 1-step ablation: G_t = m_t r_t + gamma m_{t+1} q_{t+1} for t < H (G_H = q_H)."""
    return jnp.concatenate([masks[:-1] * rewards + gamma * masks[1:] * q[1:], q[-1:]])


def critic_targets(kind, q, rewards, masks, args):
    """The critic's targets for --critic-target `kind` (args: leq.Args' gamma, horizon, lam)."""
    if kind == "1step":
        return one_step_targets(q, rewards, masks, args.gamma)
    return returns(q, rewards, masks, return_coefficients(kind, args.horizon, args.lam), args.gamma)


# ============================================================================================
# Per-step action gradients D_t = dG_t / da_t (docs/ALGORITHM.md, sections 5.5-5.6)
# ============================================================================================

def action_grads_adjoint(nets: Nets, actor, critic, wm, done_fn, s0, key, horizon, coefficients, gamma,
                         variant: Variant = Variant()):
    """Imagine H steps from s0 and get every D_t = dG_t/da_t in ONE backward sweep (exact; the
    one-sweep action gradients of docs/ALGORITHM.md, section 5.6). Write one step of the returns as
        G_t = al_t q(s_t, a_t) + bp_t m_t r(s_t, a_t) + be_t G_{t+1},   be_t = bp_t gamma m_{t+1},
    with G_H = q_H (al_H = 1), and carry S_t = dG_t/ds_t, the total derivative when a_t = pi(s_t).
    The recursion, from t = H down to 0:
        D_H = dq/da(s_H, a_H),                      S_H = dq/ds(s_H, a_H) + (dpi/ds)^T D_H
        (g_s, g_a) = VJP of (s, a) -> (q, r, s') at (s_t, a_t), cotangents (al_t, bp_t m_t, be_t S_{t+1})
        D_t = g_a,                                  S_t = g_s + (dpi/ds)^T D_t
    The q part of every VJP has the constant cotangent al_t, so it is done for all t at once (one
    batched critic VJP over the (H + 1) B states); the sweep keeps only the model and policy VJPs.
    The VJPs are with respect to the inputs only (parameters are closed-over constants) and keep
    the forward pass's residuals. The ablations keep this form: with the stochastic actor, pi is
    s -> tanh(mu(s) + sigma(s) eps_t) at the step's fixed eps_t (the reparameterised sample); with
    MOBILE's penalty, r(s, a) is r - beta u(s, a), so the model VJP carries du/ds and du/da
    (through every elite, the actor at each s'_i and the critic) exactly once.
    Returns D (H + 1, B, act), the rollout, q (H + 1, B), the masks."""
    al, bp = (jnp.asarray(c, s0.dtype) for c in coefficients)
    noise = model_noise(wm, key, (horizon, s0.shape[0]))
    policy_eps, penalty_eps = variant_noise(wm, key, s0, horizon, nets.actor.act_dim, variant)

    # forward pass: a_t = pi(s_t), (r_t, s_{t+1}) = model(s_t, a_t), keeping both VJPs (a Python
    # loop over the H steps: XLA sees straight-line code and keeps the residuals where they are)
    states, actions, r, dones, u, model_vjps, pi_vjps = [s0], [], [], [], [], [], []
    for t in range(horizon + 1):
        a, pi_vjp = jax.vjp(lambda s_, t=t: nets.act(actor, s_, at(policy_eps, t)), states[t])
        actions.append(a)
        pi_vjps.append(pi_vjp)
        if t == horizon:
            break

        def model(s_, a_, t=t):
            s2, r_t, done, u_t = imagined_step(nets, actor, critic, wm, done_fn, s_, a_, noise.member[t],
                                               noise.eps[t], at(penalty_eps, t), variant)
            return (r_t, s2), (done, u_t)
        (r_t, s2), model_vjp, (done, u_t) = jax.vjp(model, states[t], a, has_aux=True)
        states.append(s2)
        r.append(r_t)
        dones.append(done.astype(s0.dtype))
        u.append(u_t)
        model_vjps.append(model_vjp)
    states, actions, r, dones = jnp.stack(states), jnp.stack(actions), jnp.stack(r), jnp.stack(dones)
    masks = alive_masks(dones)

    # the q part of every step at once: al_t (dq/ds, dq/da) at (s_t, a_t), al_H = 1
    q, q_vjp = jax.vjp(lambda s_, a_: nets.q(critic, s_, a_), states, actions)
    gq_s, gq_a = q_vjp(jnp.concatenate([al, jnp.ones(1, al.dtype)])[:, None] * jnp.ones_like(q))

    # the backward sweep
    D = [gq_a[horizon]]                                         # D_H
    S = gq_s[horizon] + pi_vjps[horizon](D[0])[0]               # S_H
    for t in reversed(range(horizon)):
        be_t = bp[t] * gamma * masks[t + 1]
        gm_s, gm_a = model_vjps[t]((bp[t] * masks[t], be_t[:, None] * S))  # the r and s' parts
        D.append(gm_a + gq_a[t])                                # D_t = g_a (model part + q part)
        S = gm_s + gq_s[t] + pi_vjps[t](D[-1])[0]               # S_t = g_s + (dpi/ds)^T D_t
    D = jnp.stack(D[::-1])
    penalties = None if variant.penalty is None else jnp.stack(u)
    return D, Rollout(states, actions, r, dones, noise, policy_eps, penalty_eps, penalties), q, masks


def returns_of_perturbation(nets, actor, critic, wm, done_fn, ro: Rollout, masks, coefficients,
                            gamma, deltas, variant: Variant = Variant()):
    """(G_0..G_H) (H + 1, B) as a function of per-step action perturbations deltas (H + 1, B, act):
    a_t = pi(s_t) + delta_t (the stochastic actor: its sample at the rollout's eps_t, plus
    delta_t), with the rollout's model samples and masks held fixed. With MOBILE's penalty the
    reward of step t is r_t - beta u(s_t, a_t) at this perturbed a_t, once (the release evaluates
    it at a_t + delta_t with a_t already perturbed, which doubles du/da)."""
    s, q, r = ro.states[0], [], []
    for t in range(ro.rewards.shape[0]):
        a = nets.act(actor, s, at(ro.policy_eps, t)) + deltas[t]
        q.append(nets.q(critic, s, a))
        s, r_t, _, _ = imagined_step(nets, actor, critic, wm, done_fn, s, a, ro.noise.member[t], ro.noise.eps[t],
                                     at(ro.penalty_eps, t), variant)
        r.append(r_t)
    q.append(nets.q(critic, s, nets.act(actor, s, at(ro.policy_eps, -1)) + deltas[-1]))
    return returns(jnp.stack(q), jnp.stack(r), masks, coefficients, gamma)


def action_grads_jacobian(nets, actor, critic, wm, done_fn, s0, key, horizon, coefficients, gamma,
                          variant: Variant = Variant()):
    """The release's way: D_t as the diagonal of the full Jacobian dG/d(delta), one reverse pass
    per output G_t (H + 1 of them, vmapped; samples are independent, so each pass serves the whole
    batch). Kept as the oracle for the adjoint sweep and as a flag for comparisons."""
    ro = imagine(nets, actor, wm, done_fn, s0, key, horizon, critic, variant)
    masks = alive_masks(ro.dones)
    G, vjp = jax.vjp(lambda d: returns_of_perturbation(nets, actor, critic, wm, done_fn, ro, masks,
                                                       coefficients, gamma, d, variant), jnp.zeros_like(ro.actions))
    rows = jnp.eye(horizon + 1)[:, :, None] * jnp.ones_like(G)  # cotangent selecting G_t, for each t
    jac = jax.vmap(lambda c: vjp(c)[0])(rows)                    # (H + 1 outputs, H + 1 steps, B, act)
    D = jac[jnp.arange(horizon + 1), jnp.arange(horizon + 1)]
    return D, ro, nets.q(critic, ro.states, ro.actions), masks


# ============================================================================================
# The critic loss: lower expectile of lambda-returns + Bellman on data + EMA (section 5.4)
# ============================================================================================

def expectile_weights(G, q, tau):
    """|tau - 1(G < q)|: returns above the value get tau, below it 1 - tau (tau < 1/2: a lower
    expectile, conservative). The critic's model loss and the actor's surrogate both use it."""
    return jnp.where(G < q, 1.0 - tau, tau)


def model_expectile(args: Args) -> float:
    """tau of the model term and of the actor's weights: MOBILE's penalty comes with plain squared
    error, the expectile 1/2 (as the release's port)."""
    return 0.5 if args.conservatism == "mobile" else args.expectile


def critic_loss(critic, ema, nets: Nets, data, data_targets, ro: Rollout, masks, args: Args):
    """(1 - beta) L_data + beta L_model + ema_weight L_ema (docs/ALGORITHM.md, section 5), with
      L_data  = mean(1/2 (y - Q(s, a))^2),  y = r + gamma mask Q(s', pi(s'))  (constant)
      L_model = mean_{t<H, batch} w_t |tau - 1(G_t < Q(s_t, a_t))| (G_t - Q(s_t, a_t))^2,
                G_t the (lambda-)returns of the current critic (constant), w_t = gamma^t m_t
      (deviation, docs/DEVIATIONS.md: L_ema's model part runs over the t < H pairs, as L_model)
      L_ema   = beta mean_t w_t (Q_ema(s_t, a_t) - Q(s_t, a_t))^2 + (1 - beta) mean_data (Q_ema - Q)^2
    Gradients flow only through Q_phi(s, a). With MOBILE's penalty the model term's expectile is 1/2
    (plain squared error; model_expectile) and the penalty is in G_t's rewards. With N critics each
    has these three terms against the same targets (computed with the ensemble's minimum) and the
    loss is their sum. Returns (loss, metrics)."""
    # one critic call over [data batch; imagined states] (fewer, larger operations)
    n_data, (steps, batch) = data.observations.shape[0], ro.states.shape[:2]
    s = jnp.concatenate([data.observations, ro.states.reshape(steps * batch, -1)])
    a = jnp.concatenate([data.actions, ro.actions.reshape(steps * batch, -1)])
    q_each = nets.q_each(critic, s, a)
    q_all = q_each[0] if nets.num_critics == 1 else jnp.min(q_each, 0)
    q_data, q_model = q_all[:n_data], q_all[n_data:].reshape(steps, batch)  # q_model: the old q_t

    G = jax.lax.stop_gradient(critic_targets(args.critic_target, q_model, ro.rewards, masks, args))
    horizon = ro.rewards.shape[0]
    w = (args.gamma ** jnp.arange(horizon))[:, None] * masks[:-1]  # w_t = gamma^t m_t
    G_t = G[:-1]
    q_ema_each = None if args.no_ema else jax.lax.stop_gradient(nets.q_each(ema, s, a))
    terms = []  # (L_data, L_model, L_ema) of each critic
    for j in range(nets.num_critics):
        q_data_j, q_t = q_each[j][:n_data], q_each[j][n_data:].reshape(steps, batch)[:-1]
        w_data = expectile_weights(data_targets, q_data_j, args.expectile) if args.data_expectile else 0.5
        loss_data = jnp.mean(w_data * (data_targets - q_data_j) ** 2)
        loss_model = jnp.mean(w * expectile_weights(G_t, q_t, model_expectile(args)) * (G_t - q_t) ** 2)
        if args.no_ema:
            loss_ema = jnp.zeros(())
        else:
            q_ema_data, q_ema_model = q_ema_each[j][:n_data], q_ema_each[j][n_data:].reshape(steps, batch)[:-1]
            loss_ema = (args.beta * jnp.mean(w * (q_ema_model - q_t) ** 2)
                        + (1 - args.beta) * jnp.mean((q_ema_data - q_data_j) ** 2))
        terms.append((loss_data, loss_model, loss_ema))
    loss_data, loss_model, loss_ema = (sum(x[1:], x[0]) for x in zip(*terms))

    data_weight = 0.0 if args.no_data_loss else 1.0 - args.beta
    loss = data_weight * loss_data + args.beta * loss_model + args.ema_weight * loss_ema
    metrics = dict(critic_loss=loss, loss_data=loss_data, loss_model=loss_model, loss_ema=loss_ema,
                   q_data=q_data.mean(), q_model=q_model[0].mean(), target_model=G[0].mean())
    return loss, metrics


def ema_update(ema, params, decay):
    """ema <- decay ema + (1 - decay) phi."""
    return jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema, params)


# ============================================================================================
# The actor surrogate (docs/ALGORITHM.md, section 5.5, Eq. 11)
# ============================================================================================

def actor_weights(G, q, tau, objective: str):
    """W_t of Eq. 11's surrogate: expectile_weights(G_t, q_t) for t < H and W_H = 1/2. (Deviation,
    docs/DEVIATIONS.md: LEQ's rule is tau if G_t > q_t else 1 - tau, the same but at an exact tie G_t == q_t.)
    For the `q` ablation (plain DDPG on imagined states, no expectile): W_t = 1/2 for every one of
    the H + 1 terms (deviation, docs/DEVIATIONS.md: the paper gives no weight for it)."""
    if objective == "q":
        return jnp.full_like(G, 0.5)
    return jnp.concatenate([expectile_weights(G[:-1], q[:-1], tau), jnp.full_like(G[-1:], 0.5)])


def actor_surrogate_loss(actor, nets: Nets, states, weights, D, eps=None):
    """Eq. 11's surrogate: -(1/N) sum_batch sum_{t=0..H} W_t D_t . pi_theta(s_t), with W_t, D_t
    and s_t constants (the deterministic policy gradient through the chain rule). The stochastic
    actor has the reparameterised sample tanh(mu_theta(s_t) + sigma_theta(s_t) eps_t) in place of
    pi_theta(s_t), with eps_t the rollout's (constant) noise."""
    return -jnp.sum(weights[..., None] * D * nets.act(actor, states, eps)) / states.shape[1]


def entropy_bonus_loss(actor, nets: Nets, states, eps, alpha):
    """The stochastic actor's entropy bonus: alpha (1/N) sum_batch sum_{t=0..H} log pi_theta(a_t | s_t)
    at the reparameterised samples a_t (s_t and eps_t constants), added to the surrogate; lowering
    it raises the entropy. A per-state bonus in the actor's loss only, not in rewards or critic
    targets (the paper gives no form: a choice, docs/DEVIATIONS.md)."""
    return alpha * jnp.sum(nets.log_prob(actor, states, eps)) / states.shape[1]


# ============================================================================================
# The update step, and K steps per jitted call (lax.scan)
# ============================================================================================

class LEQState(NamedTuple):
    actor: dict
    critic: dict
    critic_ema: dict
    actor_opt: optax.OptState
    critic_opt: optax.OptState


def make_actor_grads(nets: Nets, wm, done_fn, args: Args):
    """(state, s0, key) -> (actor gradient, metrics): the lower-expectile surrogate of the
    returns of an imagined rollout, with the OLD critic."""
    coefficients = return_coefficients(args.actor_objective, args.horizon, args.lam)
    # the action-gradient function also imagines the actor's rollout (its forward pass) and returns it
    action_grads = (action_grads_adjoint if args.action_grad == "adjoint" else
                    action_grads_jacobian)
    # the q objective has no reward terms (bp_t = 0), so MOBILE's penalty cannot reach it: not computed
    variant = variant_of(args, penalised=args.actor_objective != "q")

    def actor_grads(st: LEQState, s0, key):
        D, ro, q, masks = action_grads(nets, st.actor, st.critic, wm, done_fn, s0, key, args.horizon,
                                       coefficients, args.gamma, variant)
        G = returns(q, ro.rewards, masks, coefficients, args.gamma)
        W = actor_weights(G, q, model_expectile(args), args.actor_objective)
        states, W, D = jax.lax.stop_gradient((ro.states, W, D))
        metrics = dict(return_model=G[0].mean(), action_grad_norm=jnp.abs(D).mean())  # mean |entry|
        if not variant.stochastic:
            loss, grads = jax.value_and_grad(actor_surrogate_loss)(st.actor, nets, states, W, D)
            return grads, dict(actor_loss=loss, **metrics)

        def loss_fn(actor):  # the surrogate through the reparameterised samples, plus the entropy bonus
            bonus = entropy_bonus_loss(actor, nets, states, ro.policy_eps, args.entropy_coef)
            return actor_surrogate_loss(actor, nets, states, W, D, ro.policy_eps) + bonus, bonus
        (loss, bonus), grads = jax.value_and_grad(loss_fn, has_aux=True)(st.actor)
        log_std = nets.actor.apply(st.actor, states, nets.stats, True)[1]
        return grads, dict(actor_loss=loss, entropy_loss=bonus, log_std=log_std.mean(), **metrics)
    return actor_grads


def make_critic_grads(nets: Nets, wm, done_fn, args: Args):
    """(state, data batch, s0, key) -> (critic gradient, metrics), with the OLD actor."""
    variant = variant_of(args)

    def critic_grads(st: LEQState, batch, s0, key):
        ro = imagine(nets, st.actor, wm, done_fn, s0, key, args.horizon, st.critic, variant)
        s2 = batch.next_observations
        eps = (policy_noise(jax.random.fold_in(key, 3), (s2.shape[0], nets.actor.act_dim))
               if variant.stochastic else None)  # the stochastic actor: a' ~ pi(s'), reparameterised
        y = batch.rewards + args.gamma * batch.masks * nets.q(st.critic, s2, nets.act(st.actor, s2, eps))
        (_, metrics), grads = jax.value_and_grad(critic_loss, has_aux=True)(
            st.critic, st.critic_ema, nets, batch, jax.lax.stop_gradient(y), ro, alive_masks(ro.dones), args)
        metrics["done_rate"] = ro.dones.max(0).mean()
        if ro.penalties is not None:
            metrics["penalty"] = ro.penalties.mean()  # MOBILE's u_t over the critic's rollout
        return grads, metrics
    return critic_grads


def variant_of(args: Args, penalised: bool = True) -> Variant:
    """The imagination of these flags: --policy stochastic, --conservatism mobile (unless not penalised)."""
    mobile = args.conservatism == "mobile" and penalised
    return Variant(args.policy == "stochastic", args.mobile_beta if mobile else None)


def make_update(nets: Nets, wm, done_fn, actor_opt, critic_opt, args: Args):
    """One LEQ gradient step: actor with the old critic, critic with the old actor, then EMA."""
    actor_grads = make_actor_grads(nets, wm, done_fn, args)
    critic_grads = make_critic_grads(nets, wm, done_fn, args)

    def update(st: LEQState, data, starts, n_starts, key):
        # data: the dataset on the device; starts[:n_starts]: the states B_M is drawn from (the
        # expansion buffer's filled rows, or the dataset's states without expansion; start_states)
        k_data, k_start, k_actor, k_critic = jax.random.split(key, 4)
        # B_D: dataset transitions (s, a, r, s', mask), r transformed, mask = 1 - terminal; B_M: start
        # states from the expansion buffer's filled rows; both uniform with replacement, on the device
        rows = jax.random.randint(k_data, (args.batch_size,), 0, data.observations.shape[0])
        batch = jax.tree.map(lambda x: x[rows], data)                                      # B_D
        s0 = starts[jax.random.randint(k_start, (args.model_batch_size,), 0, n_starts)]  # B_M
        # the release draws the two rollouts independently (same starts, other model samples)
        g_actor, m_actor = actor_grads(st, s0, k_actor)
        g_critic, m_critic = critic_grads(st, batch, s0, k_critic if args.independent_rollouts else k_actor)
        updates, actor_opt_state = actor_opt.update(g_actor, st.actor_opt, st.actor)
        actor = optax.apply_updates(st.actor, updates)
        updates, critic_opt_state = critic_opt.update(g_critic, st.critic_opt, st.critic)
        critic = optax.apply_updates(st.critic, updates)
        ema = ema_update(st.critic_ema, critic, args.ema_decay)
        return LEQState(actor, critic, ema, actor_opt_state, critic_opt_state), {**m_actor, **m_critic}

    return update


def chunk_of(update):
    """K update steps as one function (st, data, starts, n_starts, base_key, step0, K); keys fold
    in the global step, so a resumed run draws the same numbers. Metrics come back averaged over
    the chunk, with each one's first non-finite step in the chunk (n_steps if none) and whether
    the final state is finite."""
    def chunk(st: LEQState, data, starts, n_starts, base_key, step0, n_steps):
        def body(st, i):
            return update(st, data, starts, n_starts, jax.random.fold_in(base_key, step0 + i))
        st, metrics = jax.lax.scan(body, st, jnp.arange(n_steps))
        finite = jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(st)]))
        first_bad = jax.tree.map(lambda x: jnp.where(jnp.isfinite(x).all(), n_steps, jnp.argmin(jnp.isfinite(x))), metrics)
        return st, jax.tree.map(jnp.mean, metrics), first_bad, finite
    return chunk


def make_train_chunk(update):
    """`chunk_of(update)` in one compiled call."""
    return jax.jit(chunk_of(update), static_argnums=6, donate_argnums=0)


# ============================================================================================
# Dataset expansion: noisy model rollouts into a FIFO ring buffer (section 5.7)
# ============================================================================================

class Buffer(NamedTuple):
    observations: jnp.ndarray
    actions: jnp.ndarray
    rewards: jnp.ndarray
    next_observations: jnp.ndarray
    masks: jnp.ndarray
    ptr: jnp.ndarray     # next row to write (the oldest row once full)
    filled: jnp.ndarray  # rows holding data


def empty_buffer(capacity: int, obs_dim: int, act_dim: int) -> Buffer:
    z = jnp.zeros
    return Buffer(z((capacity, obs_dim)), z((capacity, act_dim)), z(capacity), z((capacity, obs_dim)),
                  z(capacity), jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))


def buffer_add(buf: Buffer, obs, act, rew, next_obs, masks) -> Buffer:
    """Write n rows at ptr, overwriting the OLDEST rows once full (capacity is a multiple of n)."""
    n, capacity = obs.shape[0], buf.observations.shape[0]
    write = lambda old, new: jax.lax.dynamic_update_slice_in_dim(old, new, buf.ptr, 0)  # noqa: E731
    return Buffer(write(buf.observations, obs), write(buf.actions, act), write(buf.rewards, rew),
                  write(buf.next_observations, next_obs), write(buf.masks, masks),
                  (buf.ptr + n) % capacity, jnp.minimum(buf.filled + n, capacity))


def expansion(nets: Nets, wm, done_fn, args: Args):
    """(buf, actor, data_obs, key) -> buf: sample expand_size dataset states, roll out
    expand_length steps with a = tanh(mean + N(0, expand_noise^2)) in the model (the stochastic
    actor: tanh(mean + expand_noise sigma(s) N(0, 1))), add every transition (mask = 1 - done of
    that step; rollouts are not cut at a termination)."""
    def expand(buf: Buffer, actor, data_obs, key):
        k_start, k_roll = jax.random.split(key)
        s = data_obs[jax.random.randint(k_start, (args.expand_size,), 0, data_obs.shape[0])]

        def step(s, k):
            k_noise, k_model = jax.random.split(k)
            if args.policy == "stochastic":  # the actor's own state-dependent sigma(s), times expand_noise
                mean, log_std = nets.actor.apply(actor, s, nets.stats, True)
            else:
                mean, log_std = nets.actor.apply(actor, s, nets.stats), pretrain.ACTOR_LOG_STD
            a = jnp.tanh(mean + args.expand_noise * jnp.exp(log_std) * jax.random.normal(k_noise, mean.shape))
            s2, r, done = model_step(wm, s, a, k_model, done_fn)
            return s2, (s, a, r, s2, 1.0 - done.astype(s.dtype))

        _, rows = jax.lax.scan(step, s, jax.random.split(k_roll, args.expand_length))
        return buffer_add(buf, *(x.reshape(-1, *x.shape[2:]) for x in rows))
    return expand


def make_expand(nets: Nets, wm, done_fn, args: Args):
    """`expansion` in one compiled call."""
    return jax.jit(expansion(nets, wm, done_fn, args), donate_argnums=0)


# ============================================================================================
# Ablations that need more than a branch (docs/ALGORITHM.md, section 7)
# ============================================================================================

def mobile_uncertainty(nets: Nets, actor, critic, wm: WorldModel, s, a, eps):
    """MOBILE's model-Bellman inconsistency u(s, a) = std_i Q(s'_i, pi(s'_i)) over the elites i
    (population std), one next state per elite: s'_i = s + mu_i(s, a) + sigma_i(s, a) eps_i, the
    obs part of elite i's Gaussian, eps (E, B, obs). pi is the deterministic tanh(mean) (also with
    the stochastic actor: a choice, docs/DEVIATIONS.md) and Q the rollout's critic (an ensemble's minimum).
    As in MOBILE's code and the release, the reward and gamma are not inside the std. (Deviation,
    docs/DEVIATIONS.md: the 5 elites, as MOBILE; the release's port takes all 7 members.)"""
    x = (jnp.concatenate([s, a], -1) - wm.input_mean) / wm.input_std
    mu, logvar = world_model.ensemble_forward(wm.params, x)           # (E, B, obs + 1)
    s2 = s + mu[..., :-1] + jnp.exp(0.5 * logvar[..., :-1]) * eps      # (E, B, obs)
    return jnp.std(nets.q(critic, s2, nets.pi(actor, s2)), axis=0)


def critic_ensemble(nets: Nets, first, key, num_critics: int, obs_dim: int, act_dim: int):
    """N stacked critics: `first` (a single critic's parameters, e.g. the FQE critic) and N - 1
    freshly initialised ones (as MOBILE's critics, which differ by their initialisation only)."""
    s, a = jnp.zeros((1, obs_dim)), jnp.zeros((1, act_dim))
    others = [nets.critic.init(k, s, a, nets.stats) for k in jax.random.split(key, num_critics - 1)]
    return jax.tree.map(lambda *x: jnp.stack(x), first, *others)


def with_log_std_head(nets: Nets, actor, key, obs_dim: int, init_log_std: float):
    """A deterministic actor's parameters plus the stochastic actor's `log_std` head: kernel
    orthogonal with scale 1e-3 (the release's init; tiny, so log_std starts near init_log_std in
    every state) and bias init_log_std. The trunk and the mean head are kept as they are (the BC
    actor's), so tanh(mean) is unchanged."""
    fresh = nets.actor.init(key, jnp.zeros((1, obs_dim)), nets.stats, True)
    head = {"kernel": fresh["params"]["log_std"]["kernel"],
            "bias": jnp.full(nets.actor.act_dim, init_log_std, jnp.float32)}
    return {**actor, "params": {**actor["params"], "log_std": head}}


# ============================================================================================
# Main
# ============================================================================================

def initial_networks(args: Args, task, wm, pt_path, key):
    """The BC actor and FQE critic (docs/ALGORITHM.md, section 4), or fresh networks with
    --no-pretrain. The ablations add to them: N critics are the first one and N - 1 fresh ones
    (`critic_ensemble`: pretrain.npz holds one FQE critic); the stochastic actor is
    the actor plus a log-std head that starts near --init-log-std (`with_log_std_head`)."""
    if args.no_pretrain:
        nets = pretrain.make_nets(task, args.pretrain_settings.hidden_dims, (wm.input_mean, wm.input_std))
        actor, critic = pretrain.init_params(nets, key, task.obs_dim, task.act_dim)
    else:
        nets, actor, critic, _ = pretrain.load_pretrained(pt_path, task)
    if args.num_critics > 1:
        critic = critic_ensemble(nets, critic, jax.random.fold_in(key, 1), args.num_critics,
                                          task.obs_dim, task.act_dim)
        nets = nets._replace(num_critics=args.num_critics)
    if args.policy == "stochastic":
        actor = with_log_std_head(nets, actor, jax.random.fold_in(key, 2), task.obs_dim, args.init_log_std)
    return nets, actor, critic


def start_states(args: Args, data, buf: Buffer):
    """B_M is drawn from (array, number of valid rows): the filled part of the expansion
    buffer, or the dataset's states with --no-expansion."""
    return (data.observations, data.observations.shape[0]) if args.no_expansion else (buf.observations, buf.filled)


def optimizers(args: Args):
    """(actor's, critic's) Adam; the actor's learning rate cosine-decays to 0 over the run."""
    return optax.adam(optax.cosine_decay_schedule(args.actor_lr, max(args.total_steps, 1))), optax.adam(args.critic_lr)


def setup_seed(task, args: Args, resume, actor_opt, critic_opt):
    """(dataset, world model, termination, nets, initial state, train key, expansion key, inputs'
    fingerprints) of seed args.seed; leq_utils/upstream.py checks the inputs against the checkpoint
    being resumed, and makes the missing ones first."""
    ds, wm, pt_path, inputs = upstream.prepare(task, args, resume, world_model, pretrain)  # checked before any training
    wm_path = world_model.path_or_default(args.world_model, args.env, args.seed)
    done_fn = (world_model.load_learned_termination(wm_path, task, (wm.input_mean, wm.input_std))
               if args.learned_termination else tasks.termination_fn(task, args.goal))
    k_init, k_train, k_expand = jax.random.split(jax.random.PRNGKey(args.seed), 3)
    nets, actor, critic = initial_networks(args, task, wm, pt_path, k_init)
    ema = jax.tree.map(jnp.copy, critic)  # the EMA copy starts equal to the (pretrained) critic
    st = LEQState(actor, critic, ema, actor_opt.init(actor), critic_opt.init(critic))
    return ds, wm, done_fn, nets, st, k_train, k_expand, inputs


def chunk_size(args: Args) -> int:
    """Chunk boundaries fall on every expansion, evaluation and checkpoint step: one compile."""
    return math.gcd(args.chunk, args.expand_every, args.eval_every, args.checkpoint_every, args.total_steps or args.chunk)


def announce(args: Args, chunk: int, run_dir: Path, seeds: str) -> None:
    print(f"[leq] {args.env}, {seeds}: {args.total_steps:,} steps (evaluation every {args.eval_every:,}, "
          f"checkpoint every {args.checkpoint_every:,}, chunks of {chunk}), tau {args.expectile}, "
          f"H {args.horizon}; {run_dir}")


def finish(out_dir: Path, task, args: Args, nets: Nets, st: LEQState, inputs, metrics_log, step: int) -> dict:
    """The final evaluation (paper protocol), final_eval.json, its metrics row, then leq.npz."""
    final = evaluate.paper_protocol(task, nets, st.actor, args.final_eval_rounds, args.eval_episodes, args.seed)
    artifacts.write_json(out_dir / "final_eval.json", final)
    metrics_log.log({"step": step, "final_score": final["score"], "final_score_std": final.get("score_std", 0.0)})
    arrays = {**pretrain.networks_arrays(nets, st.actor, st.critic, st.critic_ema),
              "summary/final_score": np.array(final["score"])}
    artifacts.save_npz(out_dir / "leq.npz", arrays, "leq", task, args, inputs)  # last: it marks the run finished
    print(f"[leq] {f'seed {args.seed}: ' if out_dir.name.startswith('seed_') else ''}final score {final['score']:.1f} "
          f"+- {final.get('score_std', 0.0):.1f} ({args.final_eval_rounds} x {args.eval_episodes} episodes); "
          f"wrote {out_dir / 'leq.npz'}")
    return final


def train(args: Args) -> Path:
    from tqdm import tqdm
    args = resolve(args)
    if args.num_seeds > 1:
        return many_seeds.train(args, sys.modules[__name__])  # this file's steps, vmapped over a seed axis
    # TRY NOT TO MODIFY: the run folder (locked), a finished run, the checkpoint to resume, the inputs
    task = tasks.get_task(args.env)
    run_dir = Path(args.run_dir or f"runs/{tasks.run_name(args.env)}__leq__s{args.seed}__{time.strftime('%Y%m%d-%H%M%S')}")
    chunk = chunk_size(args)
    announce(args, chunk, run_dir, f"seed {args.seed}")
    capacity = args.expand_retain * args.expand_size * args.expand_length
    buf = empty_buffer(0 if args.no_expansion else capacity, task.obs_dim, task.act_dim)
    with artifacts.FolderLock(run_dir / "run.lock", f"run folder {run_dir}"):  # also: the folder is writable
        if artifacts.finished_run(run_dir / "leq.npz", task, args, artifacts.LEQ_RESUME_IGNORES):
            return run_dir
        resume = artifacts.newest_checkpoint(run_dir, lambda path: artifacts.read_leq_checkpoint(path, task, args, buf))
        actor_opt, critic_opt = optimizers(args)
        ds, wm, done_fn, nets, st, k_train, k_expand, inputs = setup_seed(task, args, resume, actor_opt, critic_opt)
        data = tasks.device_dataset(ds)

        step = 0
        if resume:
            st, buf, step = artifacts.load_leq_checkpoint(resume[1], st, buf)
            print(f"[leq] resuming {run_dir} from step {step}")
        artifacts.write_json(run_dir / "config.json", dataclasses.asdict(args))
        metrics_log = artifacts.MetricsLog(run_dir, step, artifacts.wandb_run(run_dir, args))

        # ALGO LOGIC: one LEQ gradient step, K of them per compiled call, and the expansion
        update = make_update(nets, wm, done_fn, actor_opt, critic_opt, args)
        train_chunk = make_train_chunk(update)
        expand = make_expand(nets, wm, done_fn, args)

        bar = tqdm(total=args.total_steps, initial=step, desc=f"LEQ {args.env}", unit="step", mininterval=2)
        last_score, t_last, saved = float("nan"), time.time(), None
        cli.STOP.armed = True  # a SIGINT/SIGTERM stops at the next chunk boundary, with a checkpoint
        while step < args.total_steps:
            # ALGO LOGIC: expand the dataset every expand_every steps, then a chunk of gradient steps
            if not args.no_expansion and step % args.expand_every == 0:
                buf = expand(buf, st.actor, data.observations, jax.random.fold_in(k_expand, step))
            if before_chunk:
                st, data = before_chunk(step, st, data)
            st, metrics, first_bad, finite = train_chunk(st, data, *start_states(args, data, buf), k_train, step, chunk)
            # TRY NOT TO MODIFY: the NaN guard, metrics, periodic evaluation, checkpoints, signals
            artifacts.check_finite(first_bad, chunk, step, bool(finite), (artifacts.checkpoints(run_dir) or [None])[-1])
            step += chunk
            metrics = {k: float(v) for k, v in metrics.items()}
            now = time.time()
            row = {"step": step, **metrics, "steps_per_s": chunk / (now - t_last)}
            t_last = now
            if step % args.eval_every == 0 or step == args.total_steps:
                result = evaluate.evaluate(task, nets, st.actor, args.eval_episodes, args.seed)
                last_score = result["score"]
                row.update(score=last_score, success=result["success"])
                t_last = time.time()  # evaluation time is not training speed
            metrics_log.log(row)
            stop = cli.STOP.signum  # read once: the checkpoint and the stop below agree
            if (step % args.checkpoint_every == 0 and step < args.total_steps) or stop:
                saved = artifacts.save_leq_checkpoint(run_dir, task, args, st, buf, step, nets.stats, inputs)
            bar.update(chunk)
            bar.set_postfix_str(f"critic {metrics['critic_loss']:.3g} q {metrics['q_data']:.3g} "
                                f"score {last_score:.1f}")
            cli.stop_if_requested(f"at step {step}, saved in {saved}", stop)
        cli.STOP.armed = False
        bar.close()
        finish(run_dir, task, args, nets, st, inputs, metrics_log, step)
    return run_dir


if __name__ == "__main__":
    cli.run_script(train, Args)
