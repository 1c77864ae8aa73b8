"""LEQ's imagination and its per-step action gradients (docs/ALGORITHM.md, sections 5 and 6), the
maths leq.py's losses are made of:

  * imagine H steps from start states with the actor and a random elite per sample per step,
    and the ablations' variants of a step (a stochastic actor, MOBILE's penalty)   -> imagine
  * the returns G_t (lambda-returns, H-step returns, Q), one recursion              -> returns
  * every D_t = dG_t / da_t in one backward sweep (and slow references for tests)   -> action_grads_adjoint

leq.py imports these; a fork that changes how LEQ imagines or what it bootstraps edits this file.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

import world_model
from networks import Nets


# ============================================================================================
# Imagination and returns
# ============================================================================================

class Variant(NamedTuple):
    """What the ablations of Tables 5/6 and 21 change in an imagined step (the defaults: LEQ)."""
    stochastic: bool = False         # a_t = tanh(mu(s_t) + sigma(s_t) eps_t), eps_t ~ N(0, I), not tanh(mu(s_t))
    penalty: Optional[float] = None  # MOBILE's beta: the reward of a step is r_t - beta u(s_t, a_t)


class Rollout(NamedTuple):
    states: jnp.ndarray   # (H + 1, B, obs)   s_0 .. s_H
    actions: jnp.ndarray  # (H + 1, B, act)   a_t = pi(s_t) (the stochastic actor: its sample)
    rewards: jnp.ndarray  # (H, B)            r_t (transformed; with MOBILE's penalty r_t - beta u_t)
    dones: jnp.ndarray    # (H, B)            done_t = T(s_t, a_t, s_{t+1})
    noise: world_model.ModelNoise  # the model's randomness per step: member (H, B), eps (H, B, obs + 1)
    policy_eps: Optional[jnp.ndarray] = None   # (H + 1, B, act) the stochastic actor's eps_t
    penalty_eps: Optional[jnp.ndarray] = None  # (H, E, B, obs) MOBILE's next-state noise of each elite
    penalties: Optional[jnp.ndarray] = None    # (H, B) MOBILE's u_t


def at(x, t):
    return None if x is None else x[t]


def policy_noise(key, shape):
    """The stochastic actor's eps ~ N(0, I) (one function, so that a test can set it to 0)."""
    return jax.random.normal(key, shape)


def variant_noise(wm: world_model.WorldModel, key, s0, horizon, act_dim, variant: Variant):
    """The randomness an ablation adds to a rollout: the stochastic actor's eps_t (H + 1, B, act)
    and MOBILE's per-elite next-state noise (H, E, B, obs). Both come from keys folded out of the
    rollout's key, so LEQ's own draws are unchanged and a resumed run draws the same numbers."""
    batch, obs_dim = s0.shape
    n_elites = len(world_model.members(wm.params))
    policy = policy_noise(jax.random.fold_in(key, 1), (horizon + 1, batch, act_dim)) if variant.stochastic else None
    penalty = (None if variant.penalty is None else
               jax.random.normal(jax.random.fold_in(key, 2), (horizon, n_elites, batch, obs_dim)))
    return policy, penalty


def mobile_uncertainty(nets: Nets, actor, critic, wm: world_model.WorldModel, s, a, eps):
    """MOBILE's model-Bellman inconsistency u(s, a) = std_i Q(s'_i, pi(s'_i)) over the elites i
    (population std), one next state per elite: s'_i = s + mu_i(s, a) + sigma_i(s, a) eps_i, the
    obs part of elite i's Gaussian, eps (E, B, obs). pi is the deterministic tanh(mean) (also with
    the stochastic actor: a choice, README) and Q the rollout's critic (an ensemble's minimum).
    As in MOBILE's code and the release, the reward and gamma are not inside the std. (Deviation,
    README: the 5 elites, as MOBILE; the release's port takes all 7 members.)"""
    x = (jnp.concatenate([s, a], -1) - wm.input_mean) / wm.input_std
    mu, logvar = world_model.ensemble_forward(wm.params, x)           # (E, B, obs + 1)
    s2 = s + mu[..., :-1] + jnp.exp(0.5 * logvar[..., :-1]) * eps      # (E, B, obs)
    return jnp.std(nets.q(critic, s2, nets.pi(actor, s2)), axis=0)


def imagined_step(nets: Nets, actor, critic, wm, done_fn, s, a, member, eps, penalty_eps, variant: Variant):
    """(s', r, done, u) of one model step; with MOBILE's penalty r is r_t - beta u(s, a) (u is
    None without it)."""
    s2, r, done = world_model.model_step_given(wm, s, a, member, eps, done_fn)
    if variant.penalty is None:
        return s2, r, done, None
    u = mobile_uncertainty(nets, actor, critic, wm, s, a, penalty_eps)
    return s2, r - variant.penalty * u, done, u


def imagine(nets: Nets, actor, wm: world_model.WorldModel, done_fn, s0, key, horizon, critic=None,
            variant: Variant = Variant()) -> Rollout:
    """H steps from s0 with the actor (deterministic; or sampled, with the stochastic ablation)
    and one random elite per sample per step. MOBILE's penalty needs the critic."""
    noise = world_model.model_noise(wm, key, (horizon, s0.shape[0]))
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
    """docs/ALGORITHM.md, section 5: G_t = (q_t + lam c_t (m_t r_t + gamma m_{t+1} G_{t+1})) / (1 + lam c_t)."""
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
# Per-step action gradients D_t = dG_t / da_t
# ============================================================================================

def action_grads_adjoint(nets: Nets, actor, critic, wm, done_fn, s0, key, horizon, coefficients, gamma,
                         variant: Variant = Variant()):
    """Imagine H steps from s0 and get every D_t = dG_t/da_t in ONE backward sweep (exact; the
    "O(H) action gradients" of docs/ALGORITHM.md). Write one step of the returns as
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
    noise = world_model.model_noise(wm, key, (horizon, s0.shape[0]))
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
        g_s, g_a = model_vjps[t]((bp[t] * masks[t], be_t[:, None] * S))  # the r and s' parts
        D.append(g_a + gq_a[t])                                 # D_t = g_a
        S = g_s + gq_s[t] + pi_vjps[t](D[-1])[0]                # S_t = g_s + (dpi/ds)^T D_t
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
