"""PPO on Brax continuous control with Adam, RMSProp, SGD or a learned optimizer, side by side.

Does an optimizer meta-trained only on gridworlds (train_lopt.py) train Brax robots? Every optimizer
gets the same PPO settings and the same seeds, one after another, in one invocation:

    python eval_brax.py --env inverted_double_pendulum --optimizers adam lopt   # lopt: the shipped checkpoint
    python eval_brax.py --env ant --backend spring --preset paper --optimizers adam lopt --lopt-path ...

Reading order: settings and presets -> PPO (rollout, loss, update, evaluation; `make_train` returns one
function, jitted end to end and vmapped over seeds) -> optimizers -> outputs -> main.
PPO follows Brax's own trainer (brax.training.agents.ppo) so that the two can be compared: Brax's
environments and training wrappers, its networks (tanh-squashed Gaussian policy) and its running
observation statistics, with the rollout, loss and update loop written here.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import gymnax
import tyro
from brax import envs
from brax.training.acme import running_statistics, specs
from brax.training.agents.ppo import losses as brax_ppo_losses
from brax.training.agents.ppo import networks as brax_ppo_networks

from common import (
    PRETRAINED_OPTIMIZER,
    REPOSITORY,
    UserError,
    atomic_write,
    check_args,
    check_choices,
    check_writable_dir,
    format_duration,
    iqm_interval,
    recorded,
    round_lr,
    run_cli,
    tune_learning_rate,
)
from open_optimizer import OPEN_WEIGHTS, mlp_neuron_activity, open_optimizer

OptimizerName = Literal["adam", "adam_brax", "rmsprop", "sgd", "sign_sgd", "lopt", "open"]


@dataclass
class Args:
    env: str = "inverted_double_pendulum"
    """any Brax environment name (brax.envs); presets exist for ant, humanoid, walker2d, hopper,
    halfcheetah, inverted_pendulum, inverted_double_pendulum and reacher"""
    backend: Literal["positional", "spring", "generalized"] = "positional"
    """Brax physics backend"""
    preset: Literal["cpu", "paper"] = "cpu"
    """'cpu': Brax's PPO settings scaled to a few CPU cores; 'paper': Brax's published settings and budget"""
    optimizers: tuple[OptimizerName, ...] = ("adam", "lopt")
    """optimizers to compare, trained one after another with the same PPO settings and seeds: adam, rmsprop, sgd,
    sign_sgd (the learned optimizer's meta-step-0 self) and lopt get the same element-wise --grad-clip; adam_brax is
    Adam as Brax's trainer sets it (no element-wise clip, optional --max-grad-norm); open is OPEN's published
    gridworld optimizer (open_optimizer.py) behind its own global-norm clip, at --learning-rates"""
    lopt_path: str = PRETRAINED_OPTIMIZER
    """learned-optimizer checkpoint (optimizer.msgpack from train_lopt.py); default: the one shipped in checkpoints/"""
    lopt_lr: float = 3e-4
    """learning rate multiplying the learned optimizer's output (the paper: 3e-4)"""
    grad_clip: float = 1.0
    """element-wise gradient clip before every optimizer but adam_brax (the paper clips the learned optimizer's input
    at 1; the same clip for Adam keeps the comparison symmetric); 0: no clip"""
    learning_rates: tuple[float, ...] = (3e-4,)
    """learning rates of adam, adam_brax, rmsprop, sgd and sign_sgd: each is run at every one (a sweep: 1e-3 3e-4
    1e-4)"""
    max_grad_norm: float | None = None
    """adam_brax only: clip gradients to this global norm (Brax's trainer: no clipping by default)"""
    total_timesteps: int = 300_000
    """training env steps per seed"""
    num_seeds: int = 3
    """independent runs per optimizer and learning rate, vmapped in one program (claims: 8 or more)"""
    num_envs: int = 512
    batch_size: int = 256
    """segments of unroll_length steps per minibatch"""
    num_minibatches: int = 8
    unroll_length: int = 5
    num_updates_per_batch: int = 4
    """epochs over each batch"""
    reward_scaling: float = 10.0
    discounting: float = 0.97
    gae_lambda: float = 0.95
    clipping_epsilon: float = 0.3
    entropy_cost: float = 1e-2
    value_coef: float = 0.5
    episode_length: int = 1000
    action_repeat: int = 1
    normalize_observations: bool = True
    policy_hidden_sizes: tuple[int, ...] = (32,) * 4
    """hidden layers of the policy network (Brax's make_ppo_networks default)"""
    value_hidden_sizes: tuple[int, ...] = (256,) * 5
    """hidden layers of the value network (Brax's default)"""
    num_evals: int = 10
    """evaluations during training, evenly spaced, plus one before training (at most one per PPO update)"""
    num_eval_envs: int = 16
    """deterministic evaluation episodes (policy mean) per evaluation, on separate environments"""
    seed: int = 0
    """0 to 2**32 - 1 (jax.random.PRNGKey keeps 32 bits)"""
    out_dir: str = "runs"
    run_name: str | None = None
    """default: brax_<env>_<backend>_s<seed>"""
    protocol: bool = False
    """run the tuned protocol on --protocol-tasks instead of one comparison (each task with its preset): adam,
    sign_sgd, lopt and open each at the lr it scores best with on --selection-seeds seeds, reported with adam_brax and lopt
    at the paper's 3e-4 on --num-seeds (default 8 here) other seeds; every run is saved under --results-dir, where
    a rerun finds it"""
    protocol_tasks: tuple[str, ...] = ("inverted_double_pendulum", "hopper", "reacher", "ant")
    """--protocol only: the tasks, run in this order (ant on the spring backend, the others positional); the
    validation family, gymnax's pendulum, is run the same way (its runs under results/validation/)"""
    selection_seeds: int = 4
    """--protocol only: seeds that pick each optimizer's lr, apart from the --num-seeds seeds reported"""
    results_dir: str = os.path.join(REPOSITORY, "results", "brax")
    """--protocol only: one folder per task of per-run files (the committed evidence; a rerun resumes from them)"""


# Brax's PPO settings, from its training notebook. "cpu" scales them to a few CPU cores:
# 512 envs, minibatches of 256 segments, 8 minibatches; budgets are sized so that adam + lopt with 3 seeds
# fit a short session on 2 idle cores (run times: docs/brax.md).
# Hopper and walker2d have no published PPO settings; ant's are used.
_LOCOMOTION = dict(reward_scaling=10.0, discounting=0.97, entropy_cost=1e-2, unroll_length=5, num_updates_per_batch=4)
_CPU = dict(num_envs=512, batch_size=256, num_minibatches=8)
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "cpu": {
        "inverted_pendulum": dict(_LOCOMOTION, **_CPU, total_timesteps=300_000),
        "inverted_double_pendulum": dict(_LOCOMOTION, **_CPU, total_timesteps=400_000),
        "hopper": dict(_LOCOMOTION, **_CPU, total_timesteps=300_000),
        "ant": dict(_LOCOMOTION, **_CPU, total_timesteps=1_000_000),  # below ~0.5M it only keeps its survival reward
        "walker2d": dict(_LOCOMOTION, **_CPU, total_timesteps=300_000),
        "halfcheetah": dict(_CPU, reward_scaling=1.0, discounting=0.95, entropy_cost=1e-3, unroll_length=20,
                            num_updates_per_batch=8, total_timesteps=300_000),
        "humanoid": dict(_LOCOMOTION, **_CPU, reward_scaling=0.1, entropy_cost=1e-3, unroll_length=10,
                         num_updates_per_batch=8, total_timesteps=300_000),
        "reacher": dict(num_envs=256, batch_size=128, num_minibatches=8, unroll_length=20, num_updates_per_batch=8,
                        reward_scaling=5.0, discounting=0.95, entropy_cost=1e-3, action_repeat=4,
                        total_timesteps=1_000_000),
        # The validation family (GYMNAX_TASKS). pendulum: 1e6 env steps, 1,568 optimizer updates (10x meta-training's
        # lifetimes); Adam at 1e-3 goes from -1485 to -176 (2 seeds). Rewards of -16..0 per step: scaled by 0.1. A
        # value network of 4 x 64 instead of Brax's 5 x 256: 6.6x the env steps/s, the same return at 2e5 steps
        # within the noise (-1115 vs -979, 4 seeds; docs/mechanism.md).
        "pendulum": dict(_CPU, reward_scaling=0.1, discounting=0.97, entropy_cost=1e-3, unroll_length=10,
                         num_updates_per_batch=4, episode_length=200, total_timesteps=1_000_000,
                         value_hidden_sizes=(64,) * 4),
    },
    "paper": {
        "inverted_pendulum": dict(_LOCOMOTION, num_envs=2048, batch_size=1024, num_minibatches=32,
                                  total_timesteps=2_000_000, num_evals=20),
        "inverted_double_pendulum": dict(_LOCOMOTION, num_envs=2048, batch_size=1024, num_minibatches=32,
                                         total_timesteps=20_000_000, num_evals=20),
        "ant": dict(_LOCOMOTION, num_envs=4096, batch_size=2048, num_minibatches=32, total_timesteps=100_000_000),
        "hopper": dict(_LOCOMOTION, num_envs=4096, batch_size=2048, num_minibatches=32, total_timesteps=50_000_000),
        "walker2d": dict(_LOCOMOTION, num_envs=4096, batch_size=2048, num_minibatches=32, total_timesteps=50_000_000),
        "humanoid": dict(_LOCOMOTION, num_envs=2048, batch_size=1024, num_minibatches=32, reward_scaling=0.1,
                         entropy_cost=1e-3, unroll_length=10, num_updates_per_batch=8, total_timesteps=100_000_000),
        "halfcheetah": dict(num_envs=2048, batch_size=512, num_minibatches=32, reward_scaling=1.0, discounting=0.95,
                            entropy_cost=1e-3, unroll_length=20, num_updates_per_batch=8, total_timesteps=50_000_000,
                            num_evals=20),
        "reacher": dict(num_envs=2048, batch_size=256, num_minibatches=32, unroll_length=50, num_updates_per_batch=8,
                        reward_scaling=5.0, discounting=0.95, entropy_cost=1e-3, action_repeat=4,
                        total_timesteps=50_000_000, num_evals=20),
    },
}


# ================================================================================================
# The validation family: gymnax's continuous classic-control tasks behind Brax's Env interface
# ================================================================================================
# Neither in meta-training (the grids) nor in the test (Brax), these tasks pick recipes, checkpoints and lrs
# (issue 42's "selection without the test"), trained by the same PPO as the Brax tasks.
GYMNAX_TASKS = {"pendulum": "Pendulum-v1"}  # any gymnax task with deterministic dynamics and a Box action space fits


class GymnaxTask(envs.Env):
    """A gymnax environment with deterministic dynamics as a Brax Env: pipeline_state is gymnax's state, actions in
    [-1, 1] (the tanh policy's range) are scaled to the task's bounds, and done is termination only (Brax's
    EpisodeWrapper ends episodes at --episode-length, as for every Brax task)."""

    def __init__(self, name: str, backend: str | None = None):  # backend: Brax's get_environment passes one
        del backend
        self._env, self._params = gymnax.make(GYMNAX_TASKS[name])
        space = self._env.action_space(self._params)
        self._low, self._high = jnp.asarray(space.low, jnp.float32), jnp.asarray(space.high, jnp.float32)
        self._key = jax.random.PRNGKey(0)  # unused by deterministic dynamics; step_env's signature takes one

    def reset(self, rng: jax.Array) -> envs.State:
        obs, state = self._env.reset_env(rng, self._params)
        zero = jnp.zeros(())
        return envs.State(pipeline_state=state, obs=obs, reward=zero, done=zero, metrics={}, info={})

    def step(self, state: envs.State, action: jax.Array) -> envs.State:
        scaled = self._low + (action + 1.0) * 0.5 * (self._high - self._low)
        obs, inner, reward, done, _ = self._env.step_env(self._key, state.pipeline_state, scaled, self._params)
        return state.replace(pipeline_state=inner, obs=obs, reward=jnp.asarray(reward, jnp.float32).reshape(()),
                             done=jnp.asarray(done, jnp.float32).reshape(()))

    @property
    def observation_size(self) -> int:
        return int(np.prod(self._env.observation_space(self._params).shape))

    @property
    def action_size(self) -> int:
        return int(np.prod(self._env.action_space(self._params).shape))

    @property
    def backend(self) -> str:
        return "gymnax"


for _name in GYMNAX_TASKS:
    envs.register_environment(_name, lambda backend=None, _name=_name, **_: GymnaxTask(_name, backend))


# ================================================================================================
# PPO
# ================================================================================================


class Transition(NamedTuple):
    obs: jax.Array
    raw_action: jax.Array  # before the tanh squashing: the Gaussian sample whose log-probability is stored
    log_prob: jax.Array
    reward: jax.Array  # unscaled
    done: jax.Array
    truncation: jax.Array  # the episode ended by the time limit, not by termination
    next_obs: jax.Array


class RunnerState(NamedTuple):
    params: brax_ppo_losses.PPONetworkParams
    opt_state: Any
    normalizer: running_statistics.RunningStatisticsState
    env_state: envs.State
    key: jax.Array


def env_steps_per_update(args: Args) -> int:
    """One PPO update collects batch_size x num_minibatches segments of unroll_length agent steps."""
    return args.batch_size * args.num_minibatches * args.unroll_length * args.action_repeat


def eval_schedule(args: Args) -> tuple[np.ndarray, np.ndarray]:
    """(PPO updates before each evaluation, env steps per seed at each evaluation), one entry per evaluation.

    Evaluation 0 comes before training; the updates are shared as evenly as possible among the other
    num_evals. A budget of fewer updates than num_evals is evaluated after each update instead, so that
    no evaluation merely repeats the one before it.
    """
    num_updates = math.ceil(args.total_timesteps / env_steps_per_update(args))
    num_evals = min(args.num_evals, num_updates)
    updates_per_period = np.diff(np.linspace(0, num_updates, num_evals + 1).round().astype(int), prepend=0)
    return updates_per_period, np.cumsum(updates_per_period) * env_steps_per_update(args)


def optimizer_steps(args: Args) -> int:
    """Optimizer updates in one training run: every PPO update takes epochs x minibatches of them."""
    return int(eval_schedule(args)[0].sum()) * args.num_updates_per_batch * args.num_minibatches


BRAX_ACTIVATION = jax.nn.silu  # make_ppo_networks' default (swish), after every layer but the last


def make_train(args: Args, env: envs.Env, optimizer: optax.GradientTransformation,
               on_eval: Callable[[int, np.ndarray], None] | None = None,
               on_trained: Callable[[int], None] | None = None):
    """train(keys) -> (final RunnerState, eval returns [evaluations, num_seeds]); jit it.

    One PPO run per key, vmapped. Before training and after each of the equal periods of PPO
    updates, the deterministic policy is evaluated. From inside the running program, on the host,
    on_trained(period) is called when a period's updates are done and on_eval(period, returns) when its
    evaluation is: progress lines, and timing of training apart from evaluation.
    """
    train_env = envs.training.wrap(env, episode_length=args.episode_length, action_repeat=args.action_repeat)
    # EvalWrapper records each episode's return until its first end; its AutoReset underneath is harmless.
    eval_env = envs.training.EvalWrapper(train_env)
    normalize = running_statistics.normalize if args.normalize_observations else (lambda obs, _: obs)
    networks = brax_ppo_networks.make_ppo_networks(env.observation_size, env.action_size,
                                                   preprocess_observations_fn=normalize,
                                                   policy_hidden_layer_sizes=args.policy_hidden_sizes,
                                                   value_hidden_layer_sizes=args.value_hidden_sizes)
    dist = networks.parametric_action_distribution
    unrolls_per_update = args.batch_size * args.num_minibatches // args.num_envs
    updates_per_period, _ = eval_schedule(args)

    def policy_logits(params, normalizer, obs):
        return networks.policy_network.apply(normalizer, params.policy, obs)

    def init(key) -> RunnerState:
        key, key_policy, key_value, key_env = jax.random.split(key, 4)
        params = brax_ppo_losses.PPONetworkParams(networks.policy_network.init(key_policy),
                                                  networks.value_network.init(key_value))
        normalizer = running_statistics.init_state(specs.Array((env.observation_size,), jnp.float32))
        env_state = train_env.reset(jax.random.split(key_env, args.num_envs))
        return RunnerState(params, optimizer.init(params), normalizer, env_state, key)

    def rollout(runner: RunnerState):
        """unrolls_per_update x unroll_length steps in every env -> Transitions [segments, unroll_length, ...]."""

        def step(carry, key):
            env_state = carry
            logits = policy_logits(runner.params, runner.normalizer, env_state.obs)
            raw_action = dist.sample_no_postprocessing(logits, key)
            next_state = train_env.step(env_state, dist.postprocess(raw_action))
            transition = Transition(env_state.obs, raw_action, dist.log_prob(logits, raw_action), next_state.reward,
                                    next_state.done, next_state.info["truncation"], next_state.obs)
            return next_state, transition

        key, key_steps = jax.random.split(runner.key)
        num_steps = unrolls_per_update * args.unroll_length
        env_state, traj = jax.lax.scan(step, runner.env_state, jax.random.split(key_steps, num_steps))
        # [unrolls * T, envs, ...] -> [unrolls * envs, T, ...]: contiguous segments of one environment each.
        segments = jax.tree.map(
            lambda x: jnp.swapaxes(x.reshape(unrolls_per_update, args.unroll_length, *x.shape[1:]), 1, 2)
            .reshape(-1, args.unroll_length, *x.shape[2:]),
            traj,
        )
        return segments, runner._replace(env_state=env_state, key=key)

    def loss_fn(params, normalizer, batch: Transition, key):
        """Clipped PPO loss on a minibatch of segments, with GAE computed under the current value function."""
        batch = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), batch)  # time first: [T, B, ...]
        logits = policy_logits(params, normalizer, batch.obs)
        values = networks.value_network.apply(normalizer, params.value, batch.obs)
        bootstrap = networks.value_network.apply(normalizer, params.value, batch.next_obs[-1])
        termination = batch.done * (1 - batch.truncation)  # a time-limit end is not a terminal state
        value_targets, advantages = brax_ppo_losses.compute_gae(
            truncation=batch.truncation, termination=termination, rewards=batch.reward * args.reward_scaling,
            values=values, bootstrap_value=bootstrap, lambda_=args.gae_lambda, discount=args.discounting)
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
        ratio = jnp.exp(dist.log_prob(logits, batch.raw_action) - batch.log_prob)
        clipped_ratio = jnp.clip(ratio, 1 - args.clipping_epsilon, 1 + args.clipping_epsilon)
        policy_loss = -jnp.mean(jnp.minimum(ratio * advantages, clipped_ratio * advantages))
        value_loss = 0.5 * args.value_coef * jnp.mean((value_targets - values) ** 2)  # Brax's scaling
        entropy = jnp.mean(dist.entropy(logits, key))  # tanh-Gaussian entropy: estimated from one sample
        return policy_loss + value_loss - args.entropy_cost * entropy

    def ppo_update(runner: RunnerState) -> RunnerState:
        segments, runner = rollout(runner)
        normalizer = running_statistics.update(runner.normalizer, segments.obs) if args.normalize_observations \
            else runner.normalizer

        def minibatch_step(carry, minibatch):
            params, opt_state, key = carry
            key, key_loss = jax.random.split(key)
            grads = jax.grad(loss_fn)(params, normalizer, minibatch, key_loss)
            # OPEN's dormancy input, as a function: an optimizer that does not call it traces nothing more.
            def activity():
                obs = normalize(minibatch.obs.reshape(-1, minibatch.obs.shape[-1]), normalizer)
                return jax.tree.map(lambda p: mlp_neuron_activity(p, obs, BRAX_ACTIVATION), params,
                                    is_leaf=lambda p: isinstance(p, dict))

            updates, opt_state = optax.with_extra_args_support(optimizer).update(grads, opt_state, params,
                                                                                 neuron_activity=activity)
            return (optax.apply_updates(params, updates), opt_state, key), None

        def epoch(carry, key):
            key_perm, key_steps = jax.random.split(key)
            shuffled = jax.tree.map(
                lambda x: jax.random.permutation(key_perm, x).reshape(args.num_minibatches, -1, *x.shape[1:]),
                segments,
            )
            params, opt_state = carry
            (params, opt_state, _), _ = jax.lax.scan(minibatch_step, (params, opt_state, key_steps), shuffled)
            return (params, opt_state), None

        key, key_epochs = jax.random.split(runner.key)
        (params, opt_state), _ = jax.lax.scan(epoch, (runner.params, runner.opt_state),
                                              jax.random.split(key_epochs, args.num_updates_per_batch))
        return runner._replace(params=params, opt_state=opt_state, normalizer=normalizer, key=key)

    def evaluate(runner: RunnerState) -> tuple[RunnerState, jax.Array]:
        """Mean return of num_eval_envs deterministic episodes (policy mean) on fresh evaluation environments."""
        key, key_reset = jax.random.split(runner.key)

        def step(state, _):
            action = dist.mode(policy_logits(runner.params, runner.normalizer, state.obs))
            return eval_env.step(state, action), None

        state = eval_env.reset(jax.random.split(key_reset, args.num_eval_envs))
        state, _ = jax.lax.scan(step, state, length=args.episode_length // args.action_repeat)
        return runner._replace(key=key), state.info["eval_metrics"].episode_metrics["reward"].mean()

    def train_period(runner: RunnerState, num_period_updates) -> RunnerState:
        # A traced update count (a while loop), so periods of any length share one compiled body.
        return jax.lax.fori_loop(0, num_period_updates, lambda _, r: ppo_update(r), runner)

    def train(keys):
        runners = jax.vmap(init)(keys)

        def run_period(runners, inputs):
            index, num_period_updates = inputs
            runners = jax.vmap(train_period, (0, None))(runners, num_period_updates)
            if on_trained is not None:
                # Handing the callback a trained parameter makes it wait for the period's updates (XLA would
                # otherwise run it as early as it likes).
                trained_param = jax.tree.leaves(runners.params)[0].reshape(len(keys), -1)[:, 0]
                jax.debug.callback(lambda i, _: on_trained(i), index, trained_param, ordered=True)
            runners, returns = jax.vmap(evaluate)(runners)
            if on_eval is not None:
                jax.debug.callback(on_eval, index, returns, ordered=True)
            return runners, returns

        inputs = (jnp.arange(len(updates_per_period)), jnp.asarray(updates_per_period))
        return jax.lax.scan(run_period, runners, inputs)

    return train


# ================================================================================================
# Optimizers
# ================================================================================================


def make_optimizer(args: Args, name: str, lr: float) -> optax.GradientTransformation:
    """One optimizer at one learning rate: the learned one is load_optimizer(--lopt-path) with lr multiplying its
    output, as in the paper; every one but adam_brax behind the element-wise --grad-clip."""
    if name == "lopt":
        from train_lopt import load_optimizer  # noqa: PLC0415 (imported only when a learned optimizer is used)

        try:
            return load_optimizer(args.lopt_path, lr, args.grad_clip or None, num_updates=optimizer_steps(args))
        except UserError as error:  # the message names the file; say which flag gave it
            raise UserError(f"--lopt-path: {error}") from None
    if name == "open":  # the actor (the policy network) gets OPEN's learned noise, the critic none
        return open_optimizer(int(eval_schedule(args)[0].sum()), lr, epochs=args.num_updates_per_batch,
                              minibatches=args.num_minibatches,
                              noise_mask=lambda params: params.replace(policy=jax.tree.map(lambda _: 1.0, params.policy),
                                                                       value=jax.tree.map(lambda _: 0.0, params.value)))
    if name == "adam_brax":
        clip = optax.clip_by_global_norm(args.max_grad_norm) if args.max_grad_norm else None
        tx = optax.adam(lr)
    else:
        clip = optax.clip(args.grad_clip) if args.grad_clip else None
        tx = {"adam": optax.adam, "rmsprop": optax.rmsprop, "sgd": optax.sgd, "sign_sgd": optax.sign_sgd}[name](lr)
    return optax.chain(clip, tx) if clip else tx


def make_optimizers(args: Args) -> dict[str, tuple[float, optax.GradientTransformation]]:
    """{run name: (learning rate, optimizer)}: each hand-designed optimizer at every --learning-rates value (named
    adam@3e-04 etc. when there are several), the learned optimizer at --lopt-lr as in the paper."""
    runs = {}
    for name in args.optimizers:
        lrs = [args.lopt_lr] if name == "lopt" else args.learning_rates
        for lr in lrs:
            label = name if len(lrs) == 1 else f"{name}@{lr:.0e}"
            runs[label] = (lr, make_optimizer(args, name, lr))
    return runs


# ================================================================================================
# Outputs
# ================================================================================================


def steps_per_second(steps: float, seconds: float) -> float | None:
    """A rate, or None when no time was measured: a tiny budget can run within the clock's resolution."""
    return steps / seconds if seconds > 0 else None


def format_rate(rate: float | None) -> str:
    return "?" if rate is None else f"{rate:,.0f}"


class ProgressPrinter:
    """on_trained/on_eval callbacks: one progress line per evaluation, and the time spent training and evaluating.

    Timing starts at the first evaluation (before any update), so it excludes compilation and the first reset.
    """

    def __init__(self, name: str, env_steps_at_eval: np.ndarray, num_seeds: int):
        self.name, self.env_steps_at_eval, self.num_seeds = name, env_steps_at_eval, num_seeds
        self.first_eval_time: float | None = None
        self.last_event_time = 0.0
        self.train_s = self.eval_s = 0.0  # after the first evaluation

    def trained(self, index) -> None:
        now = time.time()
        if self.first_eval_time is not None:
            self.train_s += now - self.last_event_time
        self.last_event_time = now

    def __call__(self, index, returns) -> None:
        index, now = int(index), time.time()
        steps, total = int(self.env_steps_at_eval[index]), int(self.env_steps_at_eval[-1])
        if self.first_eval_time is None:
            self.first_eval_time = now
            rate_text, eta_text = "", ""
        else:  # a progress line must never end a run: no time measured or no steps yet print '?'
            self.eval_s += now - self.last_event_time
            rate = steps_per_second(self.num_seeds * steps, now - self.first_eval_time)
            train_rate = steps_per_second(self.num_seeds * steps, self.train_s)
            rate_text = f" | {format_rate(rate)} env steps/s ({format_rate(train_rate)} without evaluation)"
            eta_text = f" | ETA {format_duration(self.num_seeds * (total - steps) / rate) if rate else '?'}"
        self.last_event_time = now
        returns = np.asarray(returns)
        print(f"[{self.name}] {steps:,}/{total:,} env steps x {self.num_seeds} seeds{rate_text} | eval return "
              f"{returns.mean():.1f} +- {returns.std():.1f}{eta_text}", flush=True)


def write_returns_csv(path: str, curves: dict[str, np.ndarray], env_steps: np.ndarray) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["optimizer", "seed", "env_steps", "eval_return"])
        for name, returns in curves.items():  # returns: [evaluations, num_seeds]
            for seed in range(returns.shape[1]):
                for steps, value in zip(env_steps, returns[:, seed]):
                    writer.writerow([name, seed, int(steps), f"{value:.4f}"])


def plot_returns(path: str, curves: dict[str, np.ndarray], env_steps: np.ndarray, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, returns in curves.items():
        mean, std = returns.mean(1), returns.std(1)
        (line,) = ax.plot(env_steps, mean, label=f"{name} ({returns.shape[1]} seeds)")
        ax.fill_between(env_steps, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    ax.set(xlabel="env steps", ylabel="eval return (mean +- std over seeds)", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def format_summary_table(summary: dict) -> str:
    """Final return per run: IQM over seeds with its 95% bootstrap interval, mean +- std, and the run's speed."""
    lines = [f"{'optimizer':<16}{'IQM [95% CI]':>26}{'mean +- std':>20}{'wall time':>11}{'env steps/s':>13}"
             f"{'without eval':>14}"]
    for name, s in summary.items():
        final = f"{s['final_return_mean']:.1f} +- {s['final_return_std']:.1f}"
        low, high = s["final_return_iqm_ci"][1:]
        interval = f"{s['final_return_iqm_ci'][0]:.1f} [{low:.1f}, {high:.1f}]"
        lines.append(f"{name:<16}{interval:>26}{final:>20}{format_duration(s['wall_time_s']):>11}"
                     f"{format_rate(s['env_steps_per_s']):>13}{format_rate(s['train_env_steps_per_s']):>14}")
    return "\n".join(lines)


# ================================================================================================
# The tuned protocol: each optimizer's lr picked on selection seeds, reported on other seeds
# ================================================================================================

PROTOCOL_BACKENDS = {"inverted_double_pendulum": "positional", "hopper": "positional", "reacher": "positional",
                     "ant": "spring"}  # the test family: the CPU-practical Brax tasks (docs/reference_figures.md)
# --protocol-tasks also takes the validation family (GYMNAX_TASKS); its runs go to results/validation/ by default.
VALIDATION_RESULTS = os.path.join(REPOSITORY, "results", "validation")
PROTOCOL_TUNED = ("adam", "sign_sgd", "lopt", "open")  # each at its best lr on the selection seeds
PROTOCOL_LR_GRID = (1e-4, 3e-4, 1e-3)  # around the paper's 3e-4; extended where the best is at an edge
PAPER_LR = 3e-4  # the learned optimizer's lr in the paper, and Brax's Adam lr
PROTOCOL_SEEDS = 8  # reported seeds per run unless --num-seeds says otherwise (a claim needs 8 or more)
# Fields that do not change what a run computes; every other one is part of a saved run's fingerprint.
NOT_FINGERPRINTED = ("optimizers", "learning_rates", "lopt_lr", "lopt_path", "num_seeds", "out_dir", "run_name",
                     "protocol", "protocol_tasks", "selection_seeds", "results_dir")


def protocol_keys(args: Args) -> dict[str, jax.Array]:
    """The reported seeds are a plain run's (--seed split --num-seeds ways); the selection seeds come from another
    stream of --seed, so no lr is picked on a seed it is reported on."""
    root = jax.random.PRNGKey(args.seed)
    return {"selection": jax.random.split(jax.random.fold_in(root, 1), args.selection_seeds),
            "reported": jax.random.split(root, args.num_seeds)}


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def run_fingerprint(args: Args, name: str, lr: float, seeds: str, num_seeds: int) -> dict:
    """What a saved run must match to be reused: the PPO settings, optimizer, lr, seeds and, for the learned
    optimizer, the checkpoint's contents (not its path)."""
    settings = {k: v for k, v in dataclasses.asdict(args).items() if k not in NOT_FINGERPRINTED}
    fingerprint = {"optimizer": name, "learning_rate": lr, "seeds": seeds, "num_seeds": num_seeds, "settings": settings}
    if name == "lopt":
        fingerprint["lopt_sha256"] = file_sha256(args.lopt_path)
    if name == "open":
        fingerprint["open_sha256"] = file_sha256(OPEN_WEIGHTS)
    return fingerprint


def same_fingerprint(saved: dict, current: dict) -> bool:
    """A field added to Args after a run was saved counts at its default there: new flags keep old evidence."""
    defaults = {k: v for k, v in dataclasses.asdict(Args()).items() if k not in NOT_FINGERPRINTED}
    as_saved = lambda x: json.loads(json.dumps(x))  # noqa: E731 (tuples come back from a file as lists)
    return as_saved({**saved, "settings": {**defaults, **saved.get("settings", {})}}) == as_saved(current)


def run_label(args: Args, name: str) -> str:
    """A run's file-name prefix: the optimizer's name; a learned optimizer other than the shipped one adds its
    checkpoint's hash (lopt-<sha256[:8]>), so several checkpoints share one folder and the baselines' runs."""
    if name != "lopt" or file_sha256(args.lopt_path) == file_sha256(PRETRAINED_OPTIMIZER):
        return name
    return f"lopt-{file_sha256(args.lopt_path)[:8]}"


def protocol_run(args: Args, env: envs.Env, keys: dict, name: str, lr: float, seeds: str) -> dict:
    """One optimizer at one lr on the selection or reported seeds: loaded from --results-dir/<task>/ if a run with
    the same fingerprint is there, else trained and saved (atomically, so a killed protocol resumes from it)."""
    path = os.path.join(args.results_dir, args.env, f"{run_label(args, name)}@{lr:.2e}_{seeds}.json")
    fingerprint = run_fingerprint(args, name, lr, seeds, len(keys[seeds]))
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        if same_fingerprint(saved.get("fingerprint", {}), fingerprint):
            print(f"[{args.env}] {name} at lr {lr:.2e}, {seeds} seeds: saved in {recorded(path)}", flush=True)
            return saved
    returns, summary = run_optimizer(f"{args.env} {name}@{lr:.2e} {seeds}", args, env, make_optimizer(args, name, lr),
                                     keys[seeds])
    saved = {"task": args.env, "backend": args.backend, "fingerprint": fingerprint,
             "lopt_path": recorded(args.lopt_path) if name == "lopt" else None,
             "env_steps": eval_schedule(args)[1].tolist(),
             "returns": returns.T.tolist(),  # [seed][evaluation]: evaluation 0 is before any update
             **summary}
    atomic_write(path, lambda f: f.write(json.dumps(saved, indent=1).encode()))
    return saved


def run_protocol_task(args: Args, command: str) -> dict:
    """The tuned protocol on one task; writes --results-dir/<task>/protocol.json (protocol-<sha256[:8]>.json for a
    checkpoint other than the shipped one: the picks and the reported runs)
    once every run it names is saved."""
    os.makedirs(os.path.join(args.results_dir, args.env), exist_ok=True)
    env = envs.get_environment(args.env, backend=args.backend)
    keys = protocol_keys(args)
    print(f"== {args.env} ({args.backend}): {args.total_timesteps:,} env steps per seed; lr picked on "
          f"{args.selection_seeds} selection seeds, reported on {args.num_seeds} others", flush=True)
    picked, selection = {}, {}
    for name in PROTOCOL_TUNED:
        def final_returns(lrs, name=name):
            return {lr: np.array(protocol_run(args, env, keys, name, lr, "selection")["final_returns"]) for lr in lrs}

        picked[name], sweep = tune_learning_rate(final_returns, PROTOCOL_LR_GRID)
        selection[name] = {f"{lr:.2e}": float(np.mean(r)) for lr, r in sorted(sweep.items())}
    runs = {name: (name, picked[name]) for name in PROTOCOL_TUNED}
    runs.update(lopt_paper_lr=("lopt", PAPER_LR), adam_brax=("adam_brax", PAPER_LR))
    reported = {label: protocol_run(args, env, keys, name, lr, "reported") for label, (name, lr) in runs.items()}
    protocol = {"task": args.env, "backend": args.backend, "env_steps_per_seed": int(eval_schedule(args)[1][-1]),
                "selection_seeds": args.selection_seeds, "num_seeds": args.num_seeds, "picked_lr": picked,
                "selection_mean_final_return": selection,
                "reported": {label: f"{run_label(args, name)}@{lr:.2e}_reported.json"
                             for label, (name, lr) in runs.items()},
                "lopt_path": recorded(args.lopt_path), "lopt_sha256": file_sha256(args.lopt_path),
                "command": recorded(command)}
    tag = run_label(args, "lopt")[len("lopt"):]  # another checkpoint's protocol: protocol-<sha256[:8]>.json
    atomic_write(os.path.join(args.results_dir, args.env, f"protocol{tag}.json"),
                 lambda f: f.write(json.dumps(protocol, indent=1).encode()))
    print(f"{args.env}: final return, IQM [95% CI] over {args.num_seeds} seeds (lr picked on the selection seeds)")
    for label, run in reported.items():
        iqm, low, high = iqm_interval([run["final_returns"]])
        print(f"  {label:<14} lr {runs[label][1]:.2e}  {iqm:9.1f} [{low:.1f}, {high:.1f}]")
    return protocol


def run_protocol(task_args: list[Args], command: str) -> None:
    """Every task's protocol, one after another; what is saved already is reused, so a rerun resumes."""
    start = time.time()
    for args in task_args:
        check_settings(args)
    make_optimizer(task_args[0], "lopt", PAPER_LR)  # a bad checkpoint is reported before anything runs
    for args in task_args:
        run_protocol_task(args, command)
    print(f"protocol done in {format_duration(time.time() - start)}: python results/table.py --write renders it")


# ================================================================================================
# Main
# ================================================================================================


def run_optimizer(name: str, args: Args, env: envs.Env, optimizer, keys) -> tuple[np.ndarray, dict]:
    """Compile and run one optimizer's PPO runs; returns eval returns [evaluations, num_seeds] and timings."""
    env_steps_at_eval = eval_schedule(args)[1]
    progress = ProgressPrinter(name, env_steps_at_eval, len(keys))
    train = make_train(args, env, optimizer, on_eval=progress, on_trained=progress.trained)
    start = time.time()
    compiled = jax.jit(train).lower(keys).compile()
    compile_s = time.time() - start
    print(f"[{name}] compiled in {compile_s:.0f}s", flush=True)
    _, returns = compiled(keys)
    returns = np.asarray(jax.device_get(returns))
    end = time.time()
    # Throughput from the first evaluation on: that excludes compilation and the environments' first reset.
    # None (null in summary.json) where no time was measured.
    timed_steps = len(keys) * int(env_steps_at_eval[-1])
    final = returns[-1]
    return returns, {
        "final_return_mean": float(final.mean()),
        "final_return_std": float(final.std()),
        "final_returns": [float(r) for r in final],
        "final_return_iqm_ci": list(iqm_interval([final])),
        "wall_time_s": end - start,
        "compile_s": compile_s,
        "env_steps_per_s": steps_per_second(timed_steps, end - (progress.first_eval_time or end)),
        "train_env_steps_per_s": steps_per_second(timed_steps, progress.train_s),  # evaluations excluded
        "train_s": progress.train_s,
        "eval_s": progress.eval_s,
    }


def main(args: Args) -> None:
    check_settings(args)
    runs = make_optimizers(args)  # checkpoints load before compiling
    check_writable_dir(args.out_dir)
    folder = os.path.join(args.out_dir, args.run_name or f"brax_{args.env}_{args.backend}_s{args.seed}")
    check_writable_dir(folder, "--run-name")
    env = envs.get_environment(args.env, backend=args.backend)
    keys = jax.random.split(jax.random.PRNGKey(args.seed), args.num_seeds)  # the same seeds for every optimizer
    print(f"PPO on {args.env} ({args.backend}): {args.total_timesteps:,} env steps x {args.num_seeds} seeds per "
          f"optimizer; {args.num_envs} envs, minibatches of {args.batch_size} x {args.unroll_length} steps")

    curves, summary = {}, {}
    env_steps = eval_schedule(args)[1]
    if len(env_steps) - 1 < args.num_evals:
        print(f"note: {len(env_steps) - 1} PPO updates in --total-timesteps {args.total_timesteps}, fewer than "
              f"--num-evals {args.num_evals}: evaluating after each update")
    for name, (lr, optimizer) in runs.items():
        curves[name], summary[name] = run_optimizer(name, args, env, optimizer, keys)
        summary[name]["learning_rate"] = lr
        # Written after every optimizer, so an interrupted comparison keeps what finished.
        write_returns_csv(os.path.join(folder, "returns.csv"), curves, env_steps)
        plot_returns(os.path.join(folder, "returns.png"), curves, env_steps, f"PPO on {args.env} ({args.backend})")
        report = {"env": args.env, "backend": args.backend, "optimizers": summary,
                  "env_steps_per_seed": int(env_steps[-1]), "num_seeds": args.num_seeds,
                  "settings": recorded(dataclasses.asdict(args)),
                  "command": recorded("python eval_brax.py " + " ".join(sys.argv[1:]))}
        atomic_write(os.path.join(folder, "summary.json"), lambda f: f.write(json.dumps(report, indent=2).encode()))
    print(format_summary_table(summary))
    print(f"wrote {folder}/returns.csv, returns.png, summary.json")


def parse_args(argv: list[str] | None = None, env: str | None = None) -> Args:
    """The preset for (--preset, --env) sets defaults; flags given on the command line override them. With env
    (a --protocol task), that task and its backend take --env's place."""
    argv = sys.argv[1:] if argv is None else argv
    chosen = {"--preset": "cpu", "--env": Args.env}
    for i, a in enumerate(argv):
        for flag in chosen:
            if a == flag and i + 1 < len(argv):
                chosen[flag] = argv[i + 1]
            elif a.startswith(flag + "="):
                chosen[flag] = a.split("=", 1)[1]
    task = {} if env is None else dict(env=env, backend=PROTOCOL_BACKENDS.get(env, "positional"),
                                       num_seeds=PROTOCOL_SEEDS)
    if env in GYMNAX_TASKS:
        task["results_dir"] = VALIDATION_RESULTS
    chosen["--env"] = env or chosen["--env"]
    defaults = Args(**PRESETS.get(chosen["--preset"], {}).get(chosen["--env"], {}), **task)  # bad names: later
    return tyro.cli(Args, args=argv, default=defaults, description=__doc__.split("\n")[0])


def cli(argv: list[str] | None = None) -> None:
    """One comparison (main), or with --protocol the tuned protocol on each task, each with its own preset."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if not args.protocol:
        return main(args)
    if any(a == "--env" or a.startswith("--env=") for a in argv):
        raise UserError("--env: not with --protocol; choose tasks with --protocol-tasks")
    tasks = (*PROTOCOL_BACKENDS, *GYMNAX_TASKS)
    check_choices("--protocol-tasks", args.protocol_tasks, tasks)
    if not args.protocol_tasks or len(set(args.protocol_tasks)) != len(args.protocol_tasks):
        raise UserError(f"--protocol-tasks: give each of {', '.join(tasks)} at most once")
    check_args(args, positive=("selection_seeds",))
    check_writable_dir(args.results_dir, "--results-dir")
    run_protocol([parse_args(argv, env=task) for task in args.protocol_tasks],
                 "python eval_brax.py " + " ".join(argv))


def check_settings(args: Args) -> None:
    """Reject careless flag values with one line naming the flag, before anything is built or compiled."""
    if args.env not in envs._envs:  # Brax's registry
        raise UserError(f"unknown --env {args.env!r}; Brax environments: {', '.join(sorted(envs._envs))}")
    if not args.optimizers:
        raise UserError("--optimizers: give at least one of adam, adam_brax, rmsprop, sgd, sign_sgd, lopt, open")
    if len(set(args.optimizers)) != len(args.optimizers):
        raise UserError(f"--optimizers lists a name twice: {' '.join(args.optimizers)}")
    check_args(args, positive=("total_timesteps", "num_seeds", "num_envs", "batch_size", "num_minibatches",
                               "unroll_length", "num_updates_per_batch", "episode_length", "action_repeat",
                               "num_evals", "num_eval_envs", "lopt_lr", "max_grad_norm",
                               "reward_scaling", "clipping_epsilon"),
               non_negative=("grad_clip", "entropy_cost", "value_coef"),
               unit_interval=("discounting", "gae_lambda"))
    if not args.learning_rates or not all(math.isfinite(lr) and lr > 0 for lr in args.learning_rates):
        raise UserError(f"--learning-rates {' '.join(map(str, args.learning_rates))}: give one or more finite "
                        "numbers > 0")
    segments = args.batch_size * args.num_minibatches
    if segments % args.num_envs:
        raise UserError(f"--num-envs {args.num_envs}: must divide --batch-size x --num-minibatches ({segments}): "
                        "each update collects whole unrolls from every environment")
    if args.episode_length % args.action_repeat:
        raise UserError(f"--episode-length {args.episode_length}: must be a multiple of --action-repeat "
                        f"({args.action_repeat})")
    if args.total_timesteps < (per_update := env_steps_per_update(args)):
        raise UserError(f"--total-timesteps {args.total_timesteps}: must be at least {per_update:,}, one PPO update "
                        "(--batch-size x --num-minibatches x --unroll-length x --action-repeat)")


if __name__ == "__main__":
    run_cli(cli)
