"""Meta-train a learned optimizer for RL from scratch on gridworlds (Optim4RL), then evaluate it.

    python train_lopt.py --env-group gridworld             # CPU-sized default run
    python train_lopt.py --env-group gridworld --preset paper   # the paper's scale, for an accelerator
    python train_lopt.py --env-group gridworld --eval-only       # evaluate the shipped checkpoint (or --lopt-path P)

Reading order (the section banners: grep -n "^# " train_lopt.py): the settings (Args), then the method:
learned optimizers (the Optim4RL update rule first; coordinate-wise flax modules, wrapped as an optax
GradientTransformation) -> the A2C agent -> pipeline training (reset schedule) -> the meta-loss -> the
meta-step -> evaluation. After the method, two sections a reader of it can skip: speed-only code (equivalent
to plain flax layers, faster on a CPU) and plumbing (checkpoints, time limit, metrics, plots, the meta-training
loop, main). The method is described in the README and in the Optim4RL paper (Learning to Optimize for
Reinforcement Learning, RLC 2024).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import json
import math
import os
import pathlib
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Annotated, Any, Literal, NamedTuple, get_type_hints

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro
from flax import serialization, struct
from gymnax.wrappers.purerl import LogWrapper
from jax.flatten_util import ravel_pytree
from jax.sharding import NamedSharding, PartitionSpec

from common import (
    ENV_GROUPS,
    GRIDWORLDS,
    MAX_GRID_EXTENSIONS,
    PRETRAINED_OPTIMIZER,
    REWARD_SCALES,
    Interrupted,
    StopSignals,
    UserError,
    agent_kind,
    atomic_write,
    check_args,
    check_writable_dir,
    format_duration,
    iqm,
    iqm_interval,
    load_arrays,
    load_msgpack,
    make_env,
    recorded,
    round_lr,
    run_cli,
    save_arrays,
    save_msgpack,
    selection_score,
    tune_learning_rate,
)
from open_optimizer import open_optimizer

EnvGroup = Literal[tuple(ENV_GROUPS)]  # "gridworld", any single gridworld name, or "catch"
# Marks an Args field that a resumed run may change (how long to run, where to write, how to evaluate, how fast).
# Every other field must match the saved run's (see resume_settings): the safe default for a new flag.
MayChange = "may change on --resume"
INPUT_NORMS = ("none", "tensor", "tensor_start", "global")  # --input-norm: the scale the network reads gradients on


@dataclass
class Args:
    env_group: EnvGroup = "gridworld"
    """task group: 'gridworld' (6 tasks), one gridworld name, or 'catch'; meta-training uses --meta-tasks of it, the
    final evaluation all of it"""
    meta_tasks: Literal["small", "all", "every"] = "small"
    """tasks that meta-training and validation use: 'small': the group's small gridworlds, the only ones whose
    agents learn within a CPU-sized lifetime (a group without them uses all); 'all': every task of the group, as in
    the paper; 'every': all eight gridworlds and catch, whatever the group"""
    preset: Literal["cpu", "paper"] = "cpu"
    """'cpu': sized to finish within 30 minutes on 2 CPU cores; 'paper': 512 agents/task, 3e7 steps/task"""
    lopt: Literal["optim4rl", "l2l", "linear"] = "optim4rl"
    """learned optimizer: Optim4RL (two GRUs, Adam-like), L2LGD2-style RNN, or LinearOptim"""
    grad_processing: bool = True
    """feed the optimizer (sign g, log(|g|+eps)) instead of raw g"""
    pipeline: bool = True
    """stagger agent resets over the reset interval (False: reset all agents together)"""
    num_agents: int = 8
    """agents per task in the meta-training population"""
    agents_per_chunk: Annotated[int | None, MayChange] = 2
    """meta-gradients of this many agents of a task are computed at a time (a scan over chunks), so peak memory
    follows the chunk, not the population; None: the whole population at once"""
    num_envs: int = 32
    """environment streams per agent: the final evaluation's batch (--eval-envs), so meta-training sees the gradient
    noise the optimizer is judged at; with 4, 8 agents' meta-gradients do not agree (docs/results.md). The paper: 1"""
    inner_updates: int = 4
    """K: learned-optimizer steps per meta-step, back-propagated through"""
    rollout_steps: int = 20
    reset_interval: int = 64
    """meta-steps between two resets of the same agent"""
    meta_steps: Annotated[int, MayChange] = 1000
    meta_lr: float = 1e-3
    """meta-Adam's learning rate (a lower meta-lr gives a slower, smoother rise that validation can pick from;
    docs/results.md)"""
    meta_grad_clip: float = 1.0
    """clip the (task-averaged) meta-gradient to this global norm"""
    meta_grad: Literal["truncated", "pes"] = "truncated"
    """'truncated': back-propagate through the K inner updates of each meta-step (the paper's; biased: it ignores
    how the optimizer shaped the agent before them); 'pes': persistent evolution strategies (Vicol et al. 2021),
    forward only, unbiased for the meta-loss summed over each agent's whole lifetime; agents form antithetic pairs"""
    pes_sigma: float = 0.01
    """--meta-grad pes: standard deviation of the Gaussian perturbation of the optimizer's parameters"""
    # The defaults below (policy term only, in TD units, a normalised step from sign-SGD's tuned lr) are the one
    # recipe that did not collapse on 3 meta-seeds; the paper's A2C meta-loss trains an optimizer that serves the critic,
    # and collapses (--preset paper keeps it; docs/results.md, "What was tried").
    meta_value_coef: float = 0.0
    """weight of the value term in the meta-loss (0.5: the A2C loss the agents minimise, as in the paper; 0: the
    policy and entropy terms only, so shrinking value errors cannot lower the meta-loss by itself)"""
    meta_loss_scale: Literal["raw", "td"] = "td"
    """'raw': the A2C loss in reward units, as in the paper, so a task's reward scale (1e0..1e3) weights it and the
    value term (in reward units squared) dominates; 'td': each agent's policy term divided by its rollout's RMS TD
    error and its value term by that squared, so every task and both terms count in the same units"""
    normalize_step: bool = True
    """divide the optimizer's step by its root mean square over the coordinates with a non-zero gradient, so the
    learning rate alone sets the step's size and meta-training learns only how it is shared among coordinates
    (sign-SGD's step is already normalised: meta-step 0 is unchanged)"""
    step_spread: float = math.inf
    """bound on each coordinate's step relative to its tensor's mean |step| (applied after --normalize-step): within
    [1/spread, spread] times it; 1: every coordinate of a tensor moves by the same amount, so the network sets only
    each tensor's step size over the lifetime; inf: unbounded (docs/mechanism.md: the unbounded shape is what fails
    on long lifetimes and on Brax)"""
    step_schedule: int = 0
    """learn the step's overall size as a function of training progress (the fraction of the agent's updates done):
    log10 of a factor on the lr, linear between this many knots spread over the lifetime, zero (sign-SGD) at
    meta-step 0; the optax transform then needs the run's number of updates, like a schedule. 0: no schedule (under
    --normalize-step the lr alone then sets the step's size, so the optimizer cannot anneal)"""
    input_norm: Literal[INPUT_NORMS] = "none"
    """what scale the network reads the gradient on: 'none', the absolute one (log|g| after the clip, as the paper);
    'tensor', relative to its tensor's mean |g| (over the coordinates with a non-zero gradient), so a task
    whose gradients sit a decade higher or lower looks the same to the network (OPEN and VeLO normalise their inputs
    per tensor); 'tensor_start', relative to its tensor's mean |g| at the run's first update, so the task's scale
    goes but how the gradients grow or shrink over the lifetime stays; 'global', relative to one mean |g| over all
    tensors, so the task's scale goes but the tensors' scales relative to each other stay. Meta-step 0 is sign-SGD
    either way"""
    grad_scale_range: float = 0.0
    """meta-training only: agent i's gradients are multiplied by 10^s_i before the clip and the optimizer, the s_i
    spread evenly over [-R, R] decades across each task's population, so the optimizer meets other tasks' gradient
    scales and clip fractions (Brax's PPO gradients sit about a decade above the grids'); 0: off. Validation and
    evaluation run unscaled"""
    lopt_lr: float = 1e-2
    """learning rate multiplying the learned optimizer's output (at meta-step 0 the optimizer is sign-SGD at this
    lr; 1e-2 is sign-SGD's tuned lr on both small grids at 1e5 env steps)"""
    grad_clip: float = 1.0
    """element-wise clip of agent gradients before the optimizer"""
    hidden_size: int = 8
    gamma: float = 0.995
    gae_lambda: float = 0.95
    entropy_coef: float = 0.01
    seed: int = 0
    out_dir: Annotated[str, MayChange] = "runs"
    run_name: Annotated[str | None, MayChange] = None
    """default: <env-group>_<lopt>_s<seed>"""
    save_every: Annotated[int, MayChange] = 50
    """meta-steps between checkpoints (the population-sized train state is written in the background)"""
    resume: Annotated[bool, MayChange] = False
    """continue <out-dir>/<run-name> from its last checkpoint"""
    log_every: Annotated[int, MayChange] = 10
    time_limit: Annotated[float | None, MayChange] = None
    """wall-clock seconds for the whole command: the final evaluation's baselines run first, then meta-training
    stops in time to save and to run the rest of the evaluation, timed beforehand; work that cannot fit is skipped
    and named. --resume continues the run"""
    final_eval: Annotated[bool, MayChange] = True
    """evaluate the optimizer against the baselines after meta-training"""
    val_every: Annotated[int, MayChange] = 25
    """validate every this many meta-steps (and at meta-step 0 and the last): train fresh agents with the current
    optimizer and keep the best-scoring one as optimizer_best.msgpack; 0: no validation"""
    val_seeds: int = 16
    """validation agents per task (their seeds are disjoint from the final evaluation's; with too few, the
    selection follows noise)"""
    val_steps: int = 100_000
    """environment steps per validation agent"""
    eval_only: Annotated[bool, MayChange] = False
    """skip meta-training; evaluate --lopt-path on the group"""
    lopt_path: Annotated[str | None, MayChange] = PRETRAINED_OPTIMIZER
    """checkpoint for --eval-only; default: the optimizer shipped in checkpoints/"""
    eval_open: Annotated[bool, MayChange] = True
    """tune and report OPEN (open_optimizer.py, the published learned optimizer for RL) beside the baselines in the
    final evaluation"""
    eval_tasks: Annotated[Literal["meta", "group"], MayChange] = "meta"
    """tasks of the final evaluation: 'meta': the meta-training tasks (--meta-tasks); 'group': the whole group"""
    eval_seeds: Annotated[int, MayChange] = 16
    """evaluation agents per task and optimizer (every learning rate is picked on --val-seeds other agents)"""
    eval_steps: Annotated[int, MayChange] = 100_000
    """environment steps per evaluation agent"""
    eval_envs: Annotated[int, MayChange] = 32
    """environment streams per evaluation agent (meta-training uses --num-envs)"""
    max_bad_steps: Annotated[int, MayChange] = 10
    """stop after this many consecutive non-finite meta-gradients"""
    distributed: Annotated[bool, MayChange] = False
    """multi-host: call jax.distributed.initialize() first (one process per host; auto-detected under SLURM or
    Open MPI, otherwise give the three flags below)"""
    coordinator_address: Annotated[str | None, MayChange] = None
    """multi-host: host:port of process 0"""
    num_processes: Annotated[int | None, MayChange] = None
    process_id: Annotated[int | None, MayChange] = None


PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {},
    # 512 agents per task, one env each; 3e7 env steps per task = 512 agents * 5 rollouts * 20 steps * 586 meta-steps.
    # Chunks of 64 agents: wider work for an accelerator than the CPU's 8 (a guess; not measured on one).
    # The paper's meta-loss (the agents' A2C loss in reward units) and un-normalised step.
    "paper": dict(meta_tasks="all", eval_tasks="group", num_agents=512, agents_per_chunk=64, num_envs=1, meta_steps=586,
                  reset_interval=144, eval_steps=1_000_000, val_steps=200_000, meta_value_coef=0.5,
                  meta_loss_scale="raw", normalize_step=False, lopt_lr=3e-3),
}


# ================================================================================================
# Learned optimizers: the Optim4RL update rule first, then the L2L and LinearOptim baselines
# ================================================================================================


class Optim4RL(nn.Module):
    """The Optim4RL update rule: an Adam-like step whose two "moments" are outputs of two GRUs.

        o1 = Dense(RNN1(sign g, log(|g| + LOG_EPS)))           m = sign(g) exp(o1)
        o2 = Dense(RNN2(2 log(|g| + LOG_EPS))), i.e. of log g^2  v = exp(o2)
        step = -lr m / sqrt(v + eps), eps = 1e-8                 (learned_optimizer applies the -lr)

    RNN1 and RNN2 see the processed gradient (process_gradient; with grad_processing=False, g and g^2 themselves).
    o1 and o2 are clipped to +-MAX_LOG_OUTPUT so exp() stays finite. The output layers start at zero, so at
    initialisation the step is -lr sign(g) / sqrt(1 + eps): sign-SGD, a sound optimizer to meta-train from.
    Coordinate-wise: g is a flat vector of N scalars, each with its own recurrent state (rows of carry).
    Returns the update direction m / sqrt(v + eps).
    """

    hidden_size: int = 8
    grad_processing: bool = True
    num_rnns = 2

    @nn.compact
    def __call__(self, carry, g):
        sign, log_abs = process_gradient(g)
        if self.grad_processing:
            x_m, x_v = jnp.stack([sign, log_abs], -1), 2.0 * log_abs[:, None]
        else:
            g = jax.lax.stop_gradient(g)
            x_m, x_v = g[:, None], (g * g)[:, None]
        h_m, y_m = _gru(self.hidden_size, "rnn_m")(carry[0], x_m)
        h_v, y_v = _gru(self.hidden_size, "rnn_v")(carry[1], x_v)
        o_m = jnp.clip(_zero_dense(1, "out_m")(y_m)[:, 0], -MAX_LOG_OUTPUT, MAX_LOG_OUTPUT)
        o_v = jnp.clip(_zero_dense(1, "out_v")(y_v)[:, 0], -MAX_LOG_OUTPUT, MAX_LOG_OUTPUT)
        m, v = sign * jnp.exp(o_m), jnp.exp(o_v)
        return (h_m, h_v), m / jnp.sqrt(v + 1e-8)


LOG_EPS = 1e-18  # inside log(|g| + eps): zero gradients map to a large but finite negative number
MAX_LOG_OUTPUT = 30.0  # network outputs are used as exponents; clip so exp() stays finite in float32


def process_gradient(g: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sign g, log(|g| + eps)): resolves gradients spread over many orders of magnitude."""
    g = jax.lax.stop_gradient(g)
    return jnp.sign(g), jnp.log(jnp.abs(g) + LOG_EPS)


def _gru(hidden_size: int, name: str) -> CoordinateGRUCell:
    # Small input weights: log|g| is O(10) in size, so default-scaled weights would saturate the gates.
    return CoordinateGRUCell(hidden_size, kernel_init=nn.initializers.variance_scaling(0.01, "fan_in", "normal"),
                             name=name)


def _zero_dense(features: int, name: str) -> nn.Dense:
    # Zero-initialised outputs: Optim4RL starts as sign-SGD, a sound optimizer to meta-train from.
    return nn.Dense(features, kernel_init=nn.initializers.zeros, dot_general=coordinate_dot_general, name=name)


class L2L(nn.Module):
    """L2LGD2-style baseline: an RNN over preprocessed g that outputs the update directly."""

    hidden_size: int = 8
    grad_processing: bool = True
    num_rnns = 1

    @nn.compact
    def __call__(self, carry, g):
        x = l2l_features(g) if self.grad_processing else jax.lax.stop_gradient(g)[:, None]
        h, y = _gru(self.hidden_size, "rnn")(carry[0], x)
        return (h,), _zero_dense(1, "out")(y)[:, 0]


def l2l_features(g: jax.Array, p: float = 10.0) -> jax.Array:
    """Andrychowicz et al. (2016) preprocessing: (log|g|/p, sign g) if |g| >= e^-p else (-1, e^p g)."""
    g = jax.lax.stop_gradient(g)
    large = jnp.abs(g) >= jnp.exp(-p)
    return jnp.stack(
        [jnp.where(large, jnp.log(jnp.abs(g) + LOG_EPS) / p, -1.0), jnp.where(large, jnp.sign(g), jnp.exp(p) * g)], -1
    )


class LinearOptim(nn.Module):
    """LinearOptim baseline: RNN with three outputs, update exp(o1) g + exp(o2) o3."""

    hidden_size: int = 8
    grad_processing: bool = True
    num_rnns = 1

    @nn.compact
    def __call__(self, carry, g):
        sign, log_abs = process_gradient(g)
        g = jax.lax.stop_gradient(g)
        x = jnp.stack([sign, log_abs], -1) if self.grad_processing else g[:, None]
        h, y = _gru(self.hidden_size, "rnn")(carry[0], x)
        o = _zero_dense(3, "out")(y)
        scale = jnp.exp(jnp.clip(o[:, :2], -MAX_LOG_OUTPUT, MAX_LOG_OUTPUT))
        return (h,), scale[:, 0] * g + scale[:, 1] * o[:, 2]


LOPTS = {"optim4rl": Optim4RL, "l2l": L2L, "linear": LinearOptim}


def make_lopt_net(config: dict) -> nn.Module:
    return LOPTS[config["lopt"]](hidden_size=config["hidden_size"], grad_processing=config["grad_processing"])


def lopt_config(args: Args) -> dict:
    """What load_optimizer needs to rebuild and apply the network (stored in every checkpoint)."""
    return dict(
        lopt=args.lopt,
        hidden_size=args.hidden_size,
        grad_processing=args.grad_processing,
        normalize_step=args.normalize_step,
        step_spread=args.step_spread,
        input_norm=args.input_norm,
        step_schedule=args.step_schedule,
        lopt_lr=args.lopt_lr,
        grad_clip=args.grad_clip,
    )


def initial_carry(net: nn.Module, num_coordinates: int) -> tuple[jax.Array, ...]:
    return tuple(jnp.zeros((num_coordinates, net.hidden_size)) for _ in range(net.num_rnns))


def init_lopt_params(net: nn.Module, key: jax.Array, step_schedule: int = 0):
    """The network's parameters; with step_schedule knots, also the learned log10 step factor at each (zeros)."""
    params = net.init(key, initial_carry(net, 1), jnp.zeros(1))
    if step_schedule:
        params = {"params": {**params["params"], STEP_SCHEDULE: jnp.zeros(step_schedule)}}
    return params


STEP_SCHEDULE = "step_schedule"  # its parameter's name: the network's apply ignores it
MAX_LOG10_STEP_FACTOR = 2.0  # the schedule's factor stays within 1e-2..1e2


def step_factor(knots: jax.Array, count: jax.Array, num_updates: int) -> jax.Array:
    """10 ** (the knots' values linearly interpolated at the training progress count / (num_updates - 1))."""
    progress = jnp.minimum(count / max(num_updates - 1, 1), 1.0)
    log10_factor = jnp.interp(progress, jnp.linspace(0.0, 1.0, knots.shape[0]), knots)
    return 10.0 ** jnp.clip(log10_factor, -MAX_LOG10_STEP_FACTOR, MAX_LOG10_STEP_FACTOR)


# --- The learned optimizer as an optax GradientTransformation, as agents use it: clip, then the network's step ---

class LearnedOptState(NamedTuple):
    carry: tuple[jax.Array, ...]  # per-coordinate recurrent state, each (num_coordinates, hidden_size)
    count: jax.Array | None = None  # updates taken; only with a step schedule
    reference: jax.Array | None = None  # each tensor's first non-zero mean |g| (0 until then); only 'tensor_start'


def learned_optimizer(
    net: nn.Module, lopt_params, learning_rate: float, rematerialize: bool = False, normalize_step: bool = False,
    step_spread: float = math.inf, num_updates: int | None = None, input_norm: str = "none",
) -> optax.GradientTransformation:
    """A learned optimizer as an optax transformation; all parameter leaves are one flat coordinate batch.

    input_norm 'tensor' feeds the network each gradient divided by its tensor's mean |g| over the coordinates with a
    non-zero gradient (a scale-free input); 'tensor_start' divides by that mean at the first update where the
    tensor's gradient is non-zero, a fixed reference per run (scale-free across tasks; the lifetime's trend kept);
    'global' divides every gradient by one mean |g| over all coordinates with a non-zero gradient (the task's scale
    gone, the tensors' scales relative to each other kept); 'none' feeds it the gradient itself.

    normalize_step divides the network's step by its RMS over the coordinates with a non-zero gradient (the others
    do not move under Optim4RL), so the step's size is the learning rate's alone. step_spread then bounds each
    coordinate's |step| to [1/step_spread, step_spread] times its tensor's mean |step| (over the same coordinates).
    A step schedule in lopt_params (--step-schedule) finally multiplies the step by its factor at the training
    progress: num_updates, the number of updates the run will take, is then required, as an optax schedule's horizon.

    rematerialize (meta-training, which differentiates through the updates) puts each update under
    jax.checkpoint: the backward pass keeps only the update's inputs and recomputes the GRU gate activations
    (about 200 floats per coordinate), one update at a time.
    """
    apply = jax.checkpoint(net.apply) if rematerialize else net.apply
    if input_norm not in INPUT_NORMS:
        raise UserError(f"input_norm {input_norm!r}: must be one of {', '.join(INPUT_NORMS)}")
    schedule = lopt_params["params"].get(STEP_SCHEDULE)
    if schedule is not None and (num_updates is None or num_updates < 1):
        raise UserError(f"this learned optimizer has a step schedule over training progress: pass num_updates, the "
                        f"number of updates the run takes (>= 1), got {num_updates}")

    def init(params):
        count = None if schedule is None else jnp.zeros((), jnp.int32)
        reference = jnp.zeros(len(jax.tree.leaves(params))) if input_norm == "tensor_start" else None
        return LearnedOptState(initial_carry(net, ravel_pytree(params)[0].size), count, reference)

    def update(grads, state, params=None):
        del params
        flat, unravel = ravel_pytree(grads)
        moving, ids = flat != 0, tensor_ids(grads)
        seen, reference = flat, state.reference
        if input_norm != "none":
            # The mean |g|, not the RMS: squares of float32 gradients under- or overflow at extreme scales.
            groups = np.zeros_like(ids) if input_norm == "global" else ids  # 'global': all tensors as one
            scale = jax.lax.stop_gradient(tensor_means(jnp.abs(flat), moving, groups))
            if input_norm == "tensor_start":
                reference = jnp.where(reference > 0, reference, scale)
                scale = reference
            scale = scale[groups]  # > 0 wherever the gradient is non-zero, unless a mean underflows
            seen = jax.lax.stop_gradient(flat / jnp.where(scale > 0, scale, 1.0))
        carry, direction = apply(lopt_params, state.carry, seen)
        if normalize_step:
            direction = direction / (jnp.sqrt(jnp.sum(jnp.square(direction)) / jnp.maximum(jnp.sum(moving), 1))
                                     + 1e-12)
        if step_spread < math.inf:
            direction = bound_spread(direction, moving, ids, step_spread)
        if schedule is None:
            return unravel(-learning_rate * direction), LearnedOptState(carry, None, reference)
        factor = step_factor(schedule, state.count, num_updates)
        return unravel(-learning_rate * factor * direction), LearnedOptState(carry, state.count + 1, reference)

    return optax.GradientTransformation(init, update)


def tensor_ids(tree) -> np.ndarray:
    """For each coordinate of ravel_pytree(tree), the index of its leaf (static: shapes only)."""
    leaves = jax.tree.leaves(tree)
    return np.repeat(np.arange(len(leaves)), [int(np.prod(leaf.shape)) for leaf in leaves])


def tensor_means(values: jax.Array, moving: jax.Array, ids: np.ndarray) -> jax.Array:
    """Each tensor's mean of values over its moving coordinates (0 where none moves; ids from tensor_ids)."""
    num_tensors = int(ids.max()) + 1 if ids.size else 0
    count = jax.ops.segment_sum(moving.astype(values.dtype), ids, num_tensors)
    return jax.ops.segment_sum(values * moving, ids, num_tensors) / jnp.maximum(count, 1)


def bound_spread(direction: jax.Array, moving: jax.Array, ids: np.ndarray, spread: float) -> jax.Array:
    """Each coordinate's |direction| clipped to [1/spread, spread] times its tensor's mean over the moving ones."""
    magnitude = jnp.abs(direction) * moving
    mean = tensor_means(magnitude, moving, ids)[ids]
    return jnp.sign(direction) * jnp.clip(magnitude, mean / spread, mean * spread)


def step_options(config: dict) -> dict:
    """The input scale and the step's post-processing a checkpoint was meta-trained with (older checkpoints predate
    step_spread and input_norm; the step schedule is in its parameters)."""
    return dict(normalize_step=config.get("normalize_step", False), step_spread=config.get("step_spread", math.inf),
                input_norm=config.get("input_norm", "none"))


def with_grad_clip(tx: optax.GradientTransformation, grad_clip: float | None) -> optax.GradientTransformation:
    """Element-wise clip of the gradient, then tx (the paper clips every optimizer's input at 1)."""
    return optax.chain(optax.clip(grad_clip), tx) if grad_clip else tx


def clipped_learned_optimizer(net: nn.Module, lopt_params, learning_rate, grad_clip: float | None,
                              rematerialize: bool = False,
                              normalize_step: bool = False,
                              step_spread: float = math.inf,
                              num_updates: int | None = None,
                              input_norm: str = "none") -> optax.GradientTransformation:
    """The learned optimizer as agents use it everywhere: element-wise clip, then the network's step."""
    return with_grad_clip(learned_optimizer(net, lopt_params, learning_rate, rematerialize, normalize_step,
                                            step_spread, num_updates, input_norm), grad_clip)


def load_optimizer(path: str, learning_rate: float | None = None, grad_clip: float | None = -1.0,
                   num_updates: int | None = None):
    """Load a trained learned optimizer as an `optax.GradientTransformation`.

    The recurrent state lives in the optax state, so it works under `jax.jit` and inside `optax.chain`.
    By default it uses the learning rate and element-wise gradient clip it was meta-trained with;
    pass `grad_clip=None` to drop the clip. An optimizer meta-trained with --step-schedule needs num_updates, the
    number of updates the run will take (like an optax schedule's horizon); others ignore it.
    """
    ckpt = read_optimizer_checkpoint(path)
    config = ckpt["config"]
    lr = config["lopt_lr"] if learning_rate is None else learning_rate
    clip = config["grad_clip"] if grad_clip == -1.0 else grad_clip
    return clipped_learned_optimizer(make_lopt_net(config), ckpt["params"], lr, clip, **step_options(config),
                                     num_updates=num_updates)


# ================================================================================================
# The A2C agent (inner learner): task, actor-critic network, loss, TD(lambda) targets, one update
# ================================================================================================


class ActorCritic(nn.Module):
    """The paper's agents. small: MLP(32); big: Conv(16, 2x2) on (H, W, C) planes then MLP(32); catch: MLP(256)."""

    kind: str
    num_actions: int

    @nn.compact
    def __call__(self, obs):  # obs: (batch, *observation_shape)
        x = obs.astype(jnp.float32)
        if self.kind == "big":
            x = nn.relu(Conv2x2(16)(x))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(256 if self.kind == "catch" else 32)(x))
        return nn.Dense(self.num_actions)(x), nn.Dense(1)(x)[:, 0]

    # What OPEN (open_optimizer.py) reads per layer, by flax's layer names: the ReLU trunk (the conv, then the dense
    # layer) feeds two heads, the policy (Dense_1) and the value (Dense_2), each the last layer of its network.
    HIDDEN = ("Conv2x2_0", "Dense_0")

    def neuron_activity(self, params, obs):
        """Per parameter leaf, its layer's mean |output| over the batch (after the ReLU in the trunk)."""
        _, state = self.apply(params, obs, capture_intermediates=True)
        outputs = {name: out["__call__"][0] for name, out in state["intermediates"].items() if name != "__call__"}
        activity = {name: jnp.mean(jnp.abs(nn.relu(y) if name in self.HIDDEN else y), axis=tuple(range(y.ndim - 1)))
                    for name, y in outputs.items()}
        return per_layer(params, activity.get)

    @classmethod
    def layer_proportions(cls, params):
        """Depth in [0, 1] along the path input -> head: the trunk's layers in order, both heads at 1."""
        hidden = [name for name in cls.HIDDEN if name in params["params"]]
        return per_layer(params, lambda name: hidden.index(name) / len(hidden) if name in hidden else 1.0)

    @staticmethod
    def noise_mask(params):
        """OPEN adds its learned noise to the actor only: everything but the value head."""
        return per_layer(params, lambda name: float(name != "Dense_2"))


def per_layer(params, value_of):
    """A tree like params with value_of(layer name) at each of the layer's leaves."""
    return {"params": {name: jax.tree.map(lambda _: value_of(name), layer) for name, layer in params["params"].items()}}


class Transition(NamedTuple):
    obs: jax.Array
    action: jax.Array
    reward: jax.Array  # scaled, for learning
    done: jax.Array
    episode_return: jax.Array  # unscaled return of the episode that ended here (valid where done)


@dataclass(frozen=True)
class Task:
    """One environment with everything the A2C agent needs to act and learn on it."""

    name: str
    env: Any
    env_params: Any
    net: ActorCritic
    reward_scale: float
    num_envs: int
    rollout_steps: int
    gamma: float
    gae_lambda: float
    entropy_coef: float

    @staticmethod
    def make(name: str, args: Args) -> "Task":
        env, env_params = make_env(name)
        return Task(
            name,
            LogWrapper(env),
            env_params,
            ActorCritic(agent_kind(name), env.num_actions),
            REWARD_SCALES.get(name, 1.0),
            args.num_envs,
            args.rollout_steps,
            args.gamma,
            args.gae_lambda,
            args.entropy_coef,
        )

    def reset(self, key):
        return jax.vmap(self.env.reset, in_axes=(0, None))(jax.random.split(key, self.num_envs), self.env_params)

    def init_params(self, key):
        obs_shape = self.env.observation_space(self.env_params).shape
        return self.net.init(key, jnp.zeros((1, *obs_shape)))

    def rollout(self, params, env_state, obs, key, random_policy: bool = False):
        """rollout_steps steps in each of num_envs environments: (trajectory [T, E, ...], env_state, obs)."""

        def step(carry, step_key):
            env_state, obs = carry
            key_action, key_env = jax.random.split(step_key)
            logits, _ = self.net.apply(params, obs)
            if random_policy:
                logits = jnp.zeros_like(logits)
            action = jax.random.categorical(key_action, logits)
            env_keys = jax.random.split(key_env, self.num_envs)
            next_obs, env_state, reward, terminated, truncated, info = jax.vmap(
                self.env.step, in_axes=(0, 0, 0, None)
            )(env_keys, env_state, action, self.env_params)
            done = terminated | truncated
            # Episodes that end by the time limit are treated as terminal: the agent does not see time.
            transition = Transition(obs, action, reward * self.reward_scale, done, info["returned_episode_returns"])
            return (env_state, next_obs), transition

        (env_state, obs), traj = jax.lax.scan(step, (env_state, obs), jax.random.split(key, self.rollout_steps))
        return traj, env_state, obs

    def loss(self, params, traj: Transition, last_obs, value_coef: float = 0.5):
        """A2C: policy gradient + value_coef * mean squared TD(lambda) error - entropy_coef * entropy."""
        policy_loss, value_loss, entropy = self.loss_terms(params, traj, last_obs)
        return policy_loss + value_coef * value_loss - self.entropy_coef * entropy

    def loss_terms(self, params, traj: Transition, last_obs):
        """(policy-gradient loss, mean squared TD(lambda) error, entropy) of the A2C loss."""
        steps, envs = traj.action.shape
        all_obs = jnp.concatenate([traj.obs, last_obs[None]]).reshape(-1, *last_obs.shape[1:])
        logits, values = self.net.apply(params, all_obs)
        logits = logits.reshape(steps + 1, envs, -1)[:-1]
        values = values.reshape(steps + 1, envs)
        targets = lambda_returns(traj.reward, traj.done, jax.lax.stop_gradient(values), self.gamma, self.gae_lambda)
        advantages = targets - jax.lax.stop_gradient(values[:-1])
        log_probs = jax.nn.log_softmax(logits)
        action_log_prob = jnp.take_along_axis(log_probs, traj.action[..., None], -1)[..., 0]
        policy_loss = -jnp.mean(action_log_prob * advantages)
        value_loss = jnp.mean(jnp.square(targets - values[:-1]))
        entropy = -jnp.mean(jnp.sum(jnp.exp(log_probs) * log_probs, -1))
        return policy_loss, value_loss, entropy


def lambda_returns(rewards, dones, values, gamma, lam):
    """TD(lambda) targets G_t = r_t + gamma (1 - d_t) ((1 - lam) V_{t+1} + lam G_{t+1}), G_T = V_T."""

    def backward(next_return, step):
        reward, done, next_value = step
        g = reward + gamma * (1.0 - done) * ((1.0 - lam) * next_value + lam * next_return)
        return g, g

    _, targets = jax.lax.scan(backward, values[-1], (rewards, dones.astype(jnp.float32), values[1:]), reverse=True)
    return targets


class Agent(struct.PyTreeNode):
    params: Any
    opt_state: Any
    env_state: Any
    obs: jax.Array
    key: jax.Array


def init_agent(task: Task, tx: optax.GradientTransformation, key) -> Agent:
    key_params, key_env, key_agent = jax.random.split(key, 3)
    params = task.init_params(key_params)
    obs, env_state = task.reset(key_env)
    return Agent(params, tx.init(params), env_state, obs, key_agent)


def returns_summary(traj: Transition) -> tuple[jax.Array, jax.Array]:
    """(sum, count) of the unscaled returns of episodes that ended in a trajectory."""
    return jnp.sum(jnp.where(traj.done, traj.episode_return, 0.0)), jnp.sum(traj.done)


def a2c_step(task: Task, tx: optax.GradientTransformation, agent: Agent, stop_meta_gradient: bool = False,
             grad_scale=None):
    """Collect a rollout, take one optimizer step. With stop_meta_gradient the rollout and the agent
    gradient are constants to the meta-gradient: only the optimizer's update carries it. grad_scale (meta-training's
    --grad-scale-range) multiplies the gradient before the optimizer and its clip see it."""
    key, key_rollout = jax.random.split(agent.key)
    acting_params = jax.lax.stop_gradient(agent.params) if stop_meta_gradient else agent.params
    traj, env_state, obs = task.rollout(acting_params, agent.env_state, agent.obs, key_rollout)
    grads = jax.grad(task.loss)(acting_params, traj, obs)
    if grad_scale is not None:
        grads = jax.tree.map(lambda g: g * grad_scale, grads)
    # OPEN's dormancy input, as a function: an optimizer that does not call it traces nothing more.
    activity = partial(task.net.neuron_activity, acting_params, traj.obs.reshape(-1, *obs.shape[1:]))
    updates, opt_state = optax.with_extra_args_support(tx).update(grads, agent.opt_state, agent.params,
                                                                  neuron_activity=activity)
    params = optax.apply_updates(agent.params, updates)
    return Agent(params, opt_state, env_state, obs, key), returns_summary(traj)


# ================================================================================================
# Pipeline training: a population of agents at staggered stages of training (the reset schedule)
# ================================================================================================


def reset_offsets(num_agents: int, reset_interval: int, pipeline: bool) -> np.ndarray:
    """Agent i is reset when t mod reset_interval == offset_i. Pipeline: offsets spread over [0, m)."""
    if not pipeline:
        return np.zeros(num_agents, np.int32)
    return np.round(np.linspace(0, reset_interval - 1, num_agents)).astype(np.int32)


def population_grad_scales(num_agents: int, decades: float, pairs: int = 1) -> jax.Array | None:
    """--grad-scale-range: agent i's gradient factor 10^s_i, the s_i spread evenly over [-decades, decades] (an
    antithetic pair shares one); a fixed property of the population, like the reset offsets. None when off."""
    if decades == 0:
        return None
    exponents = np.linspace(-decades, decades, num_agents // pairs) if num_agents > pairs else np.zeros(1)
    return jnp.asarray(np.repeat(10.0 ** exponents, pairs), jnp.float32)


def reset_mask(meta_step, offsets, reset_interval: int):
    return (meta_step % reset_interval) == offsets


def all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


# ================================================================================================
# The meta-loss: one agent's K learned-optimizer updates, then its A2C loss on the next rollout
# ================================================================================================


META_DIAGNOSTICS = ("policy", "value", "entropy", "step")  # per agent, logged per task (see agent_meta_loss)


def agent_meta_loss(lopt_params, task: Task, agent: Agent, reset_key, reset_now, make_tx, inner_updates: int,
                    meta_value_coef: float = 0.5, meta_loss_scale: str = "raw", grad_scale=None):
    """(meta-loss, (agent, return sum, episode count, diagnostics)) of one agent, differentiable in lopt_params.

    The agent is first replaced by a fresh one if its reset is due (reset_now) or its parameters are no longer
    finite. It then takes inner_updates A2C updates with the learned optimizer make_tx(lopt_params): the
    meta-gradient flows through the optimizer's updates, the rollouts and the agent's gradients are constants to it.
    The meta-loss is the A2C loss of the updated agent on its next rollout, its value term weighted by
    meta_value_coef (0.5: the agents' own loss); with meta_loss_scale "td" the policy term is divided by the
    rollout's RMS TD error (a constant) and the value term by its square. The returned agent, after that rollout,
    carries no meta-gradient: it continues at the next meta-step. The diagnostics (no gradient) are the meta-loss's
    three terms and the mean absolute change per inner update of the parameters that moved, which is exactly lr for
    sign-SGD (Optim4RL at meta-step 0; parameters with a zero gradient do not move under either). grad_scale
    multiplies the agent's gradients in its inner updates (not the meta-loss): see a2c_step.
    """
    tx = make_tx(lopt_params)
    # Reset on schedule, or if the agent diverged (non-finite parameters).
    fresh = init_agent(task, tx, reset_key)
    reset_now = reset_now | ~all_finite(agent.params)
    agent = jax.tree.map(lambda a, b: jnp.where(reset_now, a, b), fresh, agent)

    def inner(agent, _):
        updated, returns = a2c_step(task, tx, agent, stop_meta_gradient=True, grad_scale=grad_scale)
        # Leaf by leaf: no flattened copy of the parameters on the meta-gradient's hot path.
        deltas = [jnp.abs(a - b) for a, b in zip(jax.tree.leaves(updated.params), jax.tree.leaves(agent.params))]
        moved = jnp.stack([sum(jnp.sum(d) for d in deltas), sum(jnp.sum(d > 0) for d in deltas)])
        return updated, (returns, jax.lax.stop_gradient(moved))

    agent, ((return_sum, return_count), moved) = jax.lax.scan(inner, agent, length=inner_updates)
    # Meta-loss: the A2C loss of the updated agent on the next rollout.
    key, key_rollout = jax.random.split(agent.key)
    traj, env_state, obs = task.rollout(jax.lax.stop_gradient(agent.params), agent.env_state, agent.obs, key_rollout)
    policy_loss, value_loss, entropy = task.loss_terms(agent.params, traj, obs)
    # The RMS TD error, a constant: the advantages' scale, and the square root of the value term's value.
    scale = jnp.sqrt(jax.lax.stop_gradient(value_loss)) + 1e-6 if meta_loss_scale == "td" else 1.0
    meta_loss = policy_loss / scale + meta_value_coef * value_loss / scale**2 - task.entropy_coef * entropy
    step = jnp.sum(moved[:, 0]) / jnp.maximum(jnp.sum(moved[:, 1]), 1.0)
    diagnostics = jax.lax.stop_gradient(jnp.stack([policy_loss, value_loss, entropy, step]))
    last_sum, last_count = returns_summary(traj)
    new_agent = jax.lax.stop_gradient(Agent(agent.params, agent.opt_state, env_state, obs, key))
    return meta_loss, (new_agent, return_sum.sum() + last_sum, return_count.sum() + last_count, diagnostics)


# ================================================================================================
# The meta-step: the population's meta-gradient, in chunks of agents, averaged over tasks; meta-Adam
# ================================================================================================


def antithetic_perturbations(key, num_particles: int, dim: int, sigma: float) -> jax.Array:
    """[num_particles, dim]: particles 2p and 2p + 1 get +eps_p and -eps_p, eps_p ~ N(0, sigma^2 I)."""
    eps = sigma * jax.random.normal(key, (num_particles // 2, dim))
    return jnp.stack([eps, -eps], 1).reshape(num_particles, dim)


def pes_step(flat_params, accumulators, reset_now, key, sigma: float, unroll):
    """One truncation of persistent evolution strategies (Vicol et al. 2021), antithetic.

    Every particle runs the truncation (unroll: [particles, dim] parameters -> (per-particle losses, aux)) at
    its own perturbed parameters, and keeps the sum of the perturbations it has used since its reset (the
    accumulators [particles, dim], zeroed where reset_now). sum_i accumulator_i loss_i / (n sigma^2) is then an
    unbiased estimate of the gradient of the Gaussian-smoothed loss of this truncation with respect to the
    parameters of *every* truncation of the particle's unroll so far, which is the whole-unroll gradient that a
    truncated back-propagation cuts off. Returns (gradient estimate [dim], accumulators, losses, aux).
    """
    perturbation = antithetic_perturbations(key, *accumulators.shape, sigma)
    accumulators = jnp.where(reset_now[:, None], 0.0, accumulators) + perturbation
    losses, aux = unroll(flat_params + perturbation)
    grad = jnp.einsum("n,nd->d", losses, accumulators) / (losses.shape[0] * sigma**2)
    return grad, accumulators, losses, aux


class MetaState(struct.PyTreeNode):
    meta_step: jax.Array
    lopt_params: Any
    meta_opt_state: Any
    populations: tuple  # one Agent population (leading axis = agents) per task
    key: jax.Array
    pes_accumulators: tuple = ()  # --meta-grad pes: per task, [agents, optimizer parameters]; () otherwise


class MetaTrain(NamedTuple):
    init: Any  # jitted: key -> MetaState
    meta_step: Any  # jitted: MetaState -> (MetaState, metrics); donates its argument
    state_sharding: Any  # where MetaState lives: populations split over devices, the rest replicated
    population_meta_grad: Any  # (lopt_params, task, population, key, meta_step) -> ((loss, aux), meta-gradient)
    net: nn.Module
    tasks: tuple
    # --meta-grad pes: (lopt_params, task, population, accumulators, key, meta_step) -> ((loss, aux), estimate,
    # accumulators)
    population_pes_grad: Any = None


def agents_per_chunk(args: Args) -> int:
    """--agents-per-chunk, checked; None (or more than --num-agents) means the whole population."""
    if args.meta_grad == "pes" and args.num_agents % 2:
        raise UserError(f"--num-agents {args.num_agents}: --meta-grad pes needs an even number (antithetic pairs)")
    chunk = min(args.agents_per_chunk or args.num_agents, args.num_agents)
    if chunk < 1:
        raise UserError(f"--agents-per-chunk must be positive, got {args.agents_per_chunk}")
    if args.num_agents % chunk:
        raise UserError(f"--num-agents {args.num_agents} must be a multiple of --agents-per-chunk {chunk}")
    return chunk


def make_meta_train(args: Args, task_names: tuple[str, ...]) -> MetaTrain:
    """Build the meta-training functions for a group of tasks.

    meta_step is one jitted function over all tasks: per task, the population is vmapped in chunks of
    --agents-per-chunk agents, one chunk after another; tasks have different observation and network shapes,
    so they are separate branches of the same program.
    The population axis is sharded over all devices; XLA all-reduces the meta-gradient's mean over agents.
    """
    tasks = tuple(Task.make(name, args) for name in task_names)
    net = make_lopt_net(lopt_config(args))
    chunk = agents_per_chunk(args)
    pes = args.meta_grad == "pes"
    # PES: agents 2p and 2p + 1 are an antithetic pair, identical until their perturbations differ: the same
    # reset schedule and the same keys (common random numbers), so their loss difference is the perturbation's.
    pairs = 2 if pes else 1
    offsets = jnp.asarray(np.repeat(reset_offsets(args.num_agents // pairs, args.reset_interval, args.pipeline), pairs))

    def agent_keys(key):
        return jnp.repeat(jax.random.split(key, args.num_agents // pairs), pairs, axis=0)

    grad_scales = population_grad_scales(args.num_agents, args.grad_scale_range, pairs)

    meta_tx = optax.apply_if_finite(
        optax.chain(optax.clip_by_global_norm(args.meta_grad_clip), optax.adam(args.meta_lr)),
        max_consecutive_errors=2**30,  # we stop the run ourselves after --max-bad-steps
    )

    def inner_tx(lopt_params):
        # An agent's lifetime is reset_interval meta-steps of K updates: its training progress runs over them.
        return clipped_learned_optimizer(net, lopt_params, args.lopt_lr, args.grad_clip, rematerialize=True,
                                         **step_options(lopt_config(args)),
                                         num_updates=args.reset_interval * args.inner_updates)

    def init(key) -> MetaState:
        key_lopt, key_pop, key = jax.random.split(key, 3)  # key_lopt: see initial_lopt_params
        lopt_params = init_lopt_params(net, key_lopt, args.step_schedule)
        tx = inner_tx(lopt_params)
        pop_keys = jax.random.split(key_pop, len(tasks))
        populations = tuple(jax.vmap(partial(init_agent, task, tx))(agent_keys(k)) for task, k in zip(tasks, pop_keys))
        dim = ravel_pytree(lopt_params)[0].size
        accumulators = tuple(jnp.zeros((args.num_agents, dim)) for _ in tasks) if pes else ()
        return MetaState(jnp.zeros((), jnp.int32), lopt_params, meta_tx.init(lopt_params), populations, key,
                         accumulators)

    def agents_meta_loss(lopt_params, task, agents, keys, reset_now, scales):
        """Summed meta-loss of some agents of a task (vmapped), divided by the population size."""
        one_agent = partial(agent_meta_loss, make_tx=inner_tx, inner_updates=args.inner_updates,
                            meta_value_coef=args.meta_value_coef, meta_loss_scale=args.meta_loss_scale)
        losses, aux = jax.vmap(one_agent, in_axes=(None, None, 0, 0, 0))(lopt_params, task, agents, keys, reset_now,
                                                                         grad_scale=scales)
        return jnp.sum(losses) / args.num_agents, aux

    num_chunks = args.num_agents // chunk

    def population_meta_grad(lopt_params, task, population, key, meta_step):
        """(mean meta-loss, aux), meta-gradient of a task's population, one chunk of agents at a time.

        Only one chunk's backward residuals (each agent's optimizer states at K steps) are alive at once, and the
        updated agents are written back into the population in place. Chunk k holds agents k, k + num_chunks, ...:
        a reshape to [chunk, num_chunks, ...] without a copy, and each chunk is spread over the devices.
        """
        value_and_grad = jax.value_and_grad(agents_meta_loss, has_aux=True)
        keys, reset_now = jax.random.split(key, args.num_agents), reset_mask(meta_step, offsets, args.reset_interval)
        population, keys, reset_now, scales = jax.tree.map(lambda x: x.reshape(chunk, num_chunks, *x.shape[1:]),
                                                           (population, keys, reset_now, grad_scales))

        def chunk_step(carry, k):
            grad_sum, population = carry
            agents = jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, k, 1, False),
                                  (population, keys, reset_now, scales))
            (loss, (agents, return_sum, return_count, diagnostics)), grad = value_and_grad(lopt_params, task, *agents)
            population = jax.tree.map(lambda x, y: jax.lax.dynamic_update_index_in_dim(x, y, k, 1), population, agents)
            return (jax.tree.map(jnp.add, grad_sum, grad), population), (loss, return_sum, return_count, diagnostics)

        zeros = jax.tree.map(jnp.zeros_like, lopt_params)
        (grad, population), (losses, return_sum, return_count, diagnostics) = jax.lax.scan(
            chunk_step, (zeros, population), jnp.arange(num_chunks))
        population, return_sum, return_count = jax.tree.map(
            lambda x: x.reshape(args.num_agents, *x.shape[2:]), (population, return_sum.T, return_count.T))
        return (jnp.sum(losses), (population, return_sum, return_count, diagnostics.mean((0, 1)))), grad

    def population_pes_grad(lopt_params, task, population, accumulators, key, meta_step):
        """population_meta_grad's counterpart under --meta-grad pes, forward only: the whole population at once."""
        flat_params, unravel = ravel_pytree(lopt_params)
        key_agents, key_perturb = jax.random.split(key)
        keys = agent_keys(key_agents)
        reset_now = reset_mask(meta_step, offsets, args.reset_interval) | ~jax.vmap(all_finite)(population.params)
        one_agent = partial(agent_meta_loss, make_tx=inner_tx, inner_updates=args.inner_updates,
                            meta_value_coef=args.meta_value_coef, meta_loss_scale=args.meta_loss_scale)

        def unroll(perturbed):
            return jax.vmap(lambda p, *a, **kw: one_agent(unravel(p), task, *a, **kw))(
                perturbed, population, keys, reset_now, grad_scale=grad_scales)

        flat_grad, accumulators, losses, (population, return_sum, return_count, diagnostics) = pes_step(
            jax.lax.stop_gradient(flat_params), accumulators, reset_now, key_perturb, args.pes_sigma, unroll)
        return (jnp.mean(losses), (population, return_sum, return_count, diagnostics.mean(0))), \
            unravel(flat_grad), accumulators

    def meta_step(state: MetaState):
        key, *task_keys = jax.random.split(state.key, len(tasks) + 1)
        grads, populations, metrics, accumulators = [], [], [], []
        for i, (task, population, task_key) in enumerate(zip(tasks, state.populations, task_keys)):
            if pes:
                (loss, (population, return_sum, return_count, diagnostics)), grad, accumulator = population_pes_grad(
                    state.lopt_params, task, population, state.pes_accumulators[i], task_key, state.meta_step)
                accumulators.append(accumulator)
            else:
                (loss, (population, return_sum, return_count, diagnostics)), grad = population_meta_grad(
                    state.lopt_params, task, population, task_key, state.meta_step
                )
            # Summed as they are: with --meta-loss-scale td each task's meta-loss is in TD-error units; with 'raw'
            # (the paper's) the reward scales (1e0..1e3) weight the tasks (docs/results.md, "Task weighting").
            grads.append(grad)
            populations.append(population)
            metrics.append(dict(meta_loss=loss, return_sum=return_sum.sum(), return_count=return_count.sum(),
                                diagnostics=diagnostics))
        grad = jax.tree.map(lambda *g: sum(g) / len(g), *grads)
        updates, meta_opt_state = meta_tx.update(grad, state.meta_opt_state, state.lopt_params)
        lopt_params = optax.apply_updates(state.lopt_params, updates)
        new_state = MetaState(state.meta_step + 1, lopt_params, meta_opt_state, tuple(populations), key,
                              tuple(accumulators))
        return new_state, dict(tasks=metrics, grad_finite=all_finite(grad))

    population = population_sharding(args.num_agents, "--num-agents")
    replicated = NamedSharding(population.mesh, PartitionSpec())
    # A pytree prefix of MetaState: one sharding per field, applied to every leaf below it.
    state_sharding = MetaState(replicated, replicated, replicated, population, replicated,
                               tuple(population for _ in tasks) if pes else ())
    return MetaTrain(
        jax.jit(init, out_shardings=state_sharding),
        jax.jit(meta_step, out_shardings=(state_sharding, replicated), donate_argnums=0),
        state_sharding,
        population_meta_grad,
        net,
        tasks,
        population_pes_grad if pes else None,
    )


def initial_lopt_params(args: Args):
    """The optimizer's parameters at meta-step 0 of a run with --seed (those make_meta_train's init draws)."""
    key_lopt = jax.random.split(jax.random.PRNGKey(args.seed), 3)[0]
    return jax.jit(partial(init_lopt_params, make_lopt_net(lopt_config(args)), step_schedule=args.step_schedule))(
        key_lopt)


def meta_task_names(args: Args, group: tuple[str, ...]) -> tuple[str, ...]:
    """--meta-tasks: the tasks that meta-training uses (each its own population, network and reward scale).

    On a CPU budget the big gridworlds' agents never learn within a lifetime, so their meta-gradients are noise
    (small, or with a sign that flips between meta-steps) at many times a small grid's cost (docs/design.md).
    """
    if args.meta_tasks == "every":
        return (*GRIDWORLDS, "catch")
    small = tuple(t for t in group if t.startswith("small_"))
    return small if args.meta_tasks == "small" and small else group


def env_steps_per_meta_step(args: Args) -> int:
    """Per task: every agent collects K + 1 rollouts (K inner updates and the meta-loss rollout)."""
    return args.num_agents * args.num_envs * (args.inner_updates + 1) * args.rollout_steps


# ================================================================================================
# Evaluation: fresh agents, every optimizer's learning rate tuned per task, IQM with bootstrap intervals
# ================================================================================================

# The official implementation's per-task learning-rate grid for Adam and RMSProp; extended where the best is at an edge.
LR_GRID = (3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4)
LOPT_LR_FACTORS = (1 / 3, 1.0, 3.0)  # the learned optimizer's own sweep, around its meta-trained lr
BASELINES = ("adam", "rmsprop", "sign_sgd")  # sign-SGD: what Optim4RL is at meta-step 0, given its own tuned lr
TUNED = (*BASELINES, "open")  # OPEN: the field's published learned optimizer (open_optimizer.py), lr tuned too
EVAL_NAMES = ("lopt", "lopt_tuned", "lopt_init", "open", "sign_sgd", "adam", "rmsprop", "random")
FINAL_FRACTION = 0.1  # "final return": mean return of the episodes that end in the last 10% of training
EVAL_STREAM, VAL_STREAM = 1, 2  # the final evaluation and validation (and lr selection) draw from separate streams
STREAM_FLAGS = {EVAL_STREAM: "--eval-seeds", VAL_STREAM: "--val-seeds"}


def make_a2c_train(task: Task, make_tx, num_updates: int, random_policy: bool = False):
    """train(key, tx_params) -> per-update (return_sum, return_count); make_tx(tx_params) builds the optimizer."""

    def train(key, tx_params):
        tx = make_tx(tx_params)
        agent = init_agent(task, tx, key)

        def update(agent, _):
            if random_policy:
                key, key_rollout = jax.random.split(agent.key)
                traj, env_state, obs = task.rollout(agent.params, agent.env_state, agent.obs, key_rollout, True)
                return agent.replace(env_state=env_state, obs=obs, key=key), returns_summary(traj)
            return a2c_step(task, tx, agent)

        _, returns = jax.lax.scan(update, agent, length=num_updates)
        return returns

    return train


def final_returns(return_sum, return_count) -> np.ndarray:
    """Per seed: the mean return of the episodes ending in the last FINAL_FRACTION of updates (NaN if none)."""
    tail = max(1, int(round(return_sum.shape[-1] * FINAL_FRACTION)))
    s, c = np.asarray(return_sum)[..., -tail:].sum(-1), np.asarray(return_count)[..., -tail:].sum(-1)
    return np.where(c > 0, s / np.maximum(c, 1), np.nan)


@lru_cache
def _seed_splitter(num_seeds: int, flag: str):
    # A jitted split places the seeds over the devices like the population (on every host); built once per size.
    return jax.jit(lambda k: jax.random.split(k, num_seeds), out_shardings=population_sharding(num_seeds, flag))


def evaluation_keys(task_name: str, stream: int, num_seeds: int, flag: str) -> jax.Array:
    """Agent seeds of a task in an evaluation stream: from the task's name alone, so a task gets the same agents in
    any group, and optimizers meta-trained with different --seed are compared on the same agents."""
    key = jax.random.fold_in(jax.random.PRNGKey(stream), zlib.crc32(task_name.encode()) & 0x7FFFFFFF)
    return _seed_splitter(num_seeds, flag)(key)


def baseline_optimizer(name: str, learning_rate) -> optax.GradientTransformation:
    return {"adam": optax.adam, "rmsprop": optax.rmsprop, "sign_sgd": optax.sign_sgd}[name](learning_rate)


def any_baseline(index, learning_rate) -> optax.GradientTransformation:
    """BASELINES[index] (index may be traced): every baseline's state is carried and lax.switch runs the chosen
    one's update, so one compiled trainer serves all the baselines, not one program each."""
    txs = [baseline_optimizer(name, learning_rate) for name in BASELINES]

    def init(params):
        return tuple(tx.init(params) for tx in txs)

    def update(updates, state, params=None):
        def branch(i):
            def run(operand):
                grads, states = operand
                step, new_state = txs[i].update(grads, states[i], params)
                return step, states[:i] + (new_state,) + states[i + 1:]
            return run

        return jax.lax.switch(index, [branch(i) for i in range(len(txs))], (updates, state))

    return optax.GradientTransformation(init, update)


class OutOfTime(Exception):
    """A piece of work that would end past --time-limit, not started."""


class TaskEvaluator:
    """Fresh A2C agents on one task: trains a batch of learning rates x seeds of one optimizer in one program.

    Learning rates, the learned optimizer's parameters and which baseline runs are arguments of the compiled
    trainer, so a sweep, another baseline or another set of parameters (validation during meta-training) does not
    compile again. Each run's time, less the compilation in it, is kept per program (run_s): --time-limit plans the
    rest of a run with it. With `deadline`
    set, a run that would end past it raises OutOfTime instead of starting.
    """

    def __init__(self, args: Args, name: str, config: dict, steps: int):
        self.args = dataclasses.replace(args, num_envs=args.eval_envs)
        self.name, self.steps, self.config = name, steps, config
        self.task = Task.make(name, self.args)
        self.num_updates = steps // (args.rollout_steps * args.eval_envs)
        self.net = make_lopt_net(config)
        self._trainers = {}
        self.run_s: dict[tuple, float] = {}  # (kind, learning rates, seeds) -> seconds of its last run
        self.deadline: Deadline | None = None

    def returns(self, kind: str, keys: jax.Array, lrs, lopt_params=None) -> np.ndarray:
        """Final returns [len(lrs), seeds] of `kind` (a baseline, 'lopt' with lopt_params, or 'random')."""
        program, work = self._program(kind, len(lrs), len(keys))
        if self.deadline is not None:
            self.deadline.check(self.run_s.get(program), work, f"{self.name}: {kind} x {len(lrs)} lr x {len(keys)}")
        trainer = program[0]
        if trainer not in self._trainers:
            clip = self.config["grad_clip"]

            def make_tx(tx_params):
                lr, lopt_params, baseline = tx_params
                if trainer == "lopt":
                    return clipped_learned_optimizer(self.net, lopt_params, lr, clip, **step_options(self.config),
                                                     num_updates=self.num_updates)
                if trainer == "random":  # its agents never update: any optimizer only sets up their state
                    return with_grad_clip(baseline_optimizer("adam", lr), clip)
                if trainer == "open":  # behind its own clip (global norm 0.5), as it was meta-trained
                    return open_optimizer(self.num_updates, lr, layer_proportions=ActorCritic.layer_proportions,
                                          noise_mask=ActorCritic.noise_mask)
                return with_grad_clip(any_baseline(baseline, lr), clip)

            train = make_a2c_train(self.task, make_tx, self.num_updates, random_policy=trainer == "random")
            self._trainers[trainer] = jax.jit(jax.vmap(jax.vmap(train, (0, None)), (None, (0, None, None))))
        baseline = jnp.int32(BASELINES.index(kind) if kind in BASELINES else 0)
        start, compiled_before = time.time(), compile_seconds()
        returns = final_returns(*self._trainers[trainer](keys, (jnp.asarray(lrs, jnp.float32), lopt_params, baseline)))
        compile_s = compile_seconds() - compiled_before
        self.run_s[program] = max(time.time() - start - compile_s, 0.0)
        if self.deadline is not None:
            self.deadline.record(compile_s, self.run_s[program], work)
        return returns

    def _program(self, kind: str, num_lrs: int, num_seeds: int) -> tuple[tuple, int]:
        trainer = "baselines" if kind in BASELINES else kind  # the baselines share one program
        return (trainer, num_lrs, num_seeds), num_lrs * num_seeds * self.num_updates

    def expected_s(self, kind: str, num_lrs: int, num_seeds: int, deadline: "Deadline") -> float:
        """How long a run of `kind` would take: its last run's time, or the deadline's estimate for a new program."""
        program, work = self._program(kind, num_lrs, num_seeds)
        return deadline.estimate(self.run_s.get(program), work)

    def lopt(self, lopt_params, keys: jax.Array, lr: float | None = None) -> np.ndarray:
        return self.returns("lopt", keys, [self.config["lopt_lr"] if lr is None else lr], lopt_params)[0]


class Evaluators:
    """One TaskEvaluator per (task, budget, optimizer config), so that validation and the final evaluation share
    compiled programs where their budgets agree. `guarded(deadline)`: runs inside it raise OutOfTime where they
    would end past the deadline."""

    def __init__(self, args: Args):
        self.args, self._made, self.deadline = args, {}, None

    def __call__(self, name: str, config: dict, steps: int) -> TaskEvaluator:
        key = (name, steps, json.dumps(config, sort_keys=True))
        if key not in self._made:
            self._made[key] = TaskEvaluator(self.args, name, config, steps)
        self._made[key].deadline = self.deadline
        return self._made[key]

    @contextlib.contextmanager
    def guarded(self, deadline: "Deadline | None"):
        self._set_deadline(deadline)
        try:
            yield
        finally:
            self._set_deadline(None)

    def _set_deadline(self, deadline: "Deadline | None") -> None:
        self.deadline = deadline
        for evaluator in self._made.values():
            evaluator.deadline = deadline


def evaluate_baselines(args: Args, evaluator: TaskEvaluator, init_params, cache: BaselineCache) -> dict:
    """The part of a task's evaluation that needs no meta-trained optimizer: each baseline at the lr it scores best
    with on the validation seeds, the random policy, and the learned optimizer at meta-step 0 at its lr (lopt_init),
    on the evaluation seeds. It also runs the learned optimizer once on the validation seeds, so that every program
    evaluate_learned runs is compiled and timed (learned_seconds) before meta-training starts."""
    val_keys = evaluation_keys(evaluator.name, VAL_STREAM, args.val_seeds, "--val-seeds")
    eval_keys = evaluation_keys(evaluator.name, EVAL_STREAM, args.eval_seeds, "--eval-seeds")
    returns, lrs, sweeps = {}, {}, {}
    for kind in TUNED if args.eval_open else BASELINES:
        lrs[kind], sweeps[kind] = tune_learning_rate(
            lambda grid: cache.returns(evaluator, kind, VAL_STREAM, args.val_seeds, grid), LR_GRID)
        returns[kind] = cache.returns(evaluator, kind, EVAL_STREAM, args.eval_seeds, [lrs[kind]])[lrs[kind]]
    returns["random"] = cache.returns(evaluator, "random", EVAL_STREAM, args.eval_seeds, [0.0])[0.0]
    lrs["lopt_init"] = float(evaluator.config["lopt_lr"])
    returns["lopt_init"] = evaluator.lopt(init_params, eval_keys)
    if ("lopt", 1, args.val_seeds) not in evaluator.run_s:
        evaluator.lopt(init_params, val_keys)
    return {"returns": returns, "lr": lrs, "sweeps": sweeps}


def learned_seconds(args: Args, evaluator: TaskEvaluator) -> float:
    """The most evaluate_learned can take on a task: its runs (two on the evaluation seeds, the sweep's on the
    validation seeds, extensions included) at the times measured in evaluate_baselines; nothing compiles again."""
    return (2 * evaluator.run_s[("lopt", 1, args.eval_seeds)]
            + (len(LOPT_LR_FACTORS) + MAX_GRID_EXTENSIONS) * evaluator.run_s[("lopt", 1, args.val_seeds)])


def evaluate_learned(args: Args, evaluator: TaskEvaluator, lopt_params, baselines: dict) -> dict:
    """A task's evaluation, completed: evaluate_baselines' part and the learned optimizer at its meta-trained lr and
    at the lr it scores best with on the validation seeds (one lr per run: the programs timed beforehand)."""
    val_keys = evaluation_keys(evaluator.name, VAL_STREAM, args.val_seeds, "--val-seeds")
    eval_keys = evaluation_keys(evaluator.name, EVAL_STREAM, args.eval_seeds, "--eval-seeds")
    returns, lrs, sweeps = dict(baselines["returns"]), dict(baselines["lr"]), dict(baselines["sweeps"])
    lr = lrs["lopt"] = float(evaluator.config["lopt_lr"])
    returns["lopt"] = evaluator.lopt(lopt_params, eval_keys)
    lrs["lopt_tuned"], sweeps["lopt"] = tune_learning_rate(
        lambda grid: {g: evaluator.lopt(lopt_params, val_keys, g) for g in grid},
        [round_lr(lr * f) for f in LOPT_LR_FACTORS])
    returns["lopt_tuned"] = (returns["lopt"] if math.isclose(lrs["lopt_tuned"], lr)
                             else evaluator.lopt(lopt_params, eval_keys, lrs["lopt_tuned"]))
    names = [n for n in EVAL_NAMES if n in returns]  # without --eval-open, no "open"
    return {"returns": {n: returns[n] for n in names}, "lr": {n: lrs.get(n) for n in names},
            "lr_sweep": {k: {lr: selection_score(r) for lr, r in sorted(s.items())} for k, s in sweeps.items()}}


class FinalEvaluation:
    """The tuned comparison on every task of the final evaluation (--eval-steps, baselines cached under
    <out-dir>/baseline_cache), in two parts: `prepare` runs evaluate_baselines before meta-training, so that the
    rest, `finish` (evaluate_learned), has a measured cost (`seconds`) that --time-limit keeps free."""

    def __init__(self, args: Args, task_names, config: dict, evaluators: Evaluators):
        self.args, self.task_names, self.config, self.evaluators = args, tuple(task_names), config, evaluators
        self.cache = BaselineCache(os.path.join(args.out_dir, "baseline_cache"))
        self.baselines: dict = {}

    def _evaluator(self, name: str) -> TaskEvaluator:
        return self.evaluators(name, self.config, self.args.eval_steps)

    def prepare(self, init_params, deadline: "Deadline | None" = None, log=print) -> None:
        """evaluate_baselines on every task; with a deadline, OutOfTime where a run would end past it."""
        with self.evaluators.guarded(deadline):
            for name in self.task_names:
                start = time.time()
                self.baselines[name] = evaluate_baselines(self.args, self._evaluator(name), init_params, self.cache)
                log(f"  eval {name}, baselines: {time.time() - start:.0f}s "
                    + " ".join(f"{k}={np.mean(v):.2f}" for k, v in self.baselines[name]["returns"].items()))

    def seconds(self) -> float:
        return sum(learned_seconds(self.args, self._evaluator(name)) for name in self.task_names)

    def finish(self, lopt_params, log=print) -> dict:
        """{task: per-seed returns, learning rates and sweeps} of every optimizer."""
        results = {}
        for name in self.task_names:
            start = time.time()
            results[name] = evaluate_learned(self.args, self._evaluator(name), lopt_params, self.baselines[name])
            log(f"  eval {name}, learned optimizer: {time.time() - start:.0f}s "
                + " ".join(f"{k}={np.mean(results[name]['returns'][k]):.2f}" for k in ("lopt", "lopt_tuned")))
        return results


# --- Statistics: normalised scores; IQM and its stratified-bootstrap interval are in common.py ---


def normalized_scores(returns: dict, name: str) -> np.ndarray:
    """Per seed: (R - mean R_random) / (mean R_adam - mean R_random), Adam being the tuned one."""
    rand, adam = np.mean(returns["random"]), np.mean(returns["adam"])
    return (np.asarray(returns[name], float) - rand) / (adam - rand + 1e-8)


def adam_beats_random(returns: dict) -> bool:
    """Whether tuned Adam's margin over the random policy exceeds twice its standard error over seeds.

    Where it does not, Adam has not learned the task within the evaluation budget, and a return normalised by that
    margin is noise: such tasks are reported but left out of the aggregate.
    """
    adam, rand = np.asarray(returns["adam"]), np.asarray(returns["random"])
    stderr = np.sqrt(np.var(adam, ddof=1) / adam.size + np.var(rand, ddof=1) / rand.size) if adam.size > 1 else 0.0
    return bool(np.mean(adam) - np.mean(rand) > 2 * stderr)


def summarize(results: dict) -> dict:
    """IQM [95% CI] of the normalised score per task and optimizer, and over the informative tasks together."""
    informative = [t for t, r in results.items() if adam_beats_random(r["returns"])]
    names = [n for n in EVAL_NAMES if all(n in r["returns"] for r in results.values())]  # older files: no "open"
    per_task = {t: {n: iqm_interval([normalized_scores(r["returns"], n)]) for n in names} for t, r in results.items()}
    aggregate = {n: iqm_interval([normalized_scores(results[t]["returns"], n) for t in informative])
                 for n in names} if informative else {}
    return {"informative_tasks": informative, "per_task": per_task, "aggregate": aggregate}


class Validator:
    """Scores optimizer parameters during meta-training: the mean normalised return of fresh agents trained with
    them (--val-seeds x --val-steps per task), over the meta-training tasks where tuned Adam beats random.

    Tuned Adam (the lr sweep of the final evaluation, on the same validation seeds; cached) and the random policy
    are the normalisers. The seeds come from the validation stream, never the final evaluation's agents. With a
    deadline, building it raises OutOfTime where a baseline's run would end past it.
    """

    def __init__(self, args: Args, task_names, evaluators: Evaluators | None = None,
                 deadline: "Deadline | None" = None, log=print):
        start, evaluators, self.baselines = time.time(), evaluators or Evaluators(args), {}
        cache = BaselineCache(os.path.join(args.out_dir, "baseline_cache"))
        self.keys, chosen = {}, {}
        with evaluators.guarded(deadline):
            for name in task_names:
                chosen[name] = evaluator = evaluators(name, lopt_config(args), args.val_steps)
                adam_lr, sweep = tune_learning_rate(
                    lambda grid: cache.returns(evaluator, "adam", VAL_STREAM, args.val_seeds, grid), LR_GRID)
                rand = cache.returns(evaluator, "random", VAL_STREAM, args.val_seeds, [0.0])[0.0]
                self.baselines[name] = {"adam": sweep[adam_lr], "random": rand}
                self.keys[name] = evaluation_keys(name, VAL_STREAM, args.val_seeds, "--val-seeds")
        # Tasks where Adam does not beat random at this budget would add noise; if that is all of them, use all.
        informative = [t for t in task_names if adam_beats_random(self.baselines[t])] or list(task_names)
        self.evaluators = {t: chosen[t] for t in informative}
        log(f"validation on {', '.join(informative)} ({args.val_seeds} seeds x {args.val_steps:,} env steps, "
            f"normalised by tuned Adam); baselines took {format_duration(time.time() - start)}")

    def seconds(self, deadline: "Deadline") -> float:
        """What one validation is expected to take, before it has run in this process (a resumed run)."""
        return sum(e.expected_s("lopt", 1, len(self.keys[t]), deadline) for t, e in self.evaluators.items())

    def __call__(self, lopt_params, deadline: "Deadline | None" = None) -> float:
        """The score; with a deadline, OutOfTime where a run would end past it."""
        scores = []
        for name, evaluator in self.evaluators.items():
            evaluator.deadline = deadline
            try:
                returns = evaluator.lopt(lopt_params, self.keys[name])
            finally:
                evaluator.deadline = None
            scores.append(np.mean(normalized_scores({"lopt": returns, **self.baselines[name]}, "lopt")))
        return float(np.mean(scores))


# ================================================================================================
# Speed-only code: equivalent to plain flax, faster on CPU; a reader of the method can skip this
# ================================================================================================
# Read CoordinateGRUCell as flax's nn.GRUCell, the optimizers' output layers as plain nn.Dense, and Conv2x2 as
# nn.Conv(features, (2, 2)): same parameters, same results (tests/test_train_lopt.py checks each). Why they are
# faster: docs/design.md, "Where the optimizer's time goes" and "Agents' convolution"; benchmarks/bench_lopt.py.


@jax.custom_vjp
def coordinate_matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x @ kernel for a handful of features per coordinate ([N, I] @ [I, O], I and O at most the hidden size).

    Plain code: `x @ kernel`. Written as I broadcast products, which XLA fuses with the GRU's gates into one pass
    over the coordinates, where a dot would write each [N, O] product to memory and read it back.
    Same values and gradients: tests/test_train_lopt.py::test_coordinate_gru_matches_flax_gru.
    """
    return sum(x[..., i, None] * kernel[i] for i in range(kernel.shape[0]))


def _coordinate_matmul_fwd(x, kernel):
    return coordinate_matmul(x, kernel), (x, kernel)


def _coordinate_matmul_bwd(residuals, dy):
    # The kernel's gradient is a reduction over all coordinates: one dot, rather than the I x O separate reductions
    # that differentiating the broadcast products would give, which made the meta-gradient slower than flax's dots.
    x, kernel = residuals
    return coordinate_matmul(dy, kernel.T), jnp.einsum("...i,...o->io", x, dy)


coordinate_matmul.defvjp(_coordinate_matmul_fwd, _coordinate_matmul_bwd)


def coordinate_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """nn.Dense's dot_general (inputs' last axis against the kernel's first), computed by coordinate_matmul.

    Plain code: nn.Dense without the dot_general argument (the optimizers' output layers, _zero_dense, and the
    GRU's layers). Same values and gradients: tests/test_train_lopt.py::test_coordinate_gru_matches_flax_gru.
    """
    del dimension_numbers, precision, preferred_element_type  # nn.Dense always contracts those two axes
    return coordinate_matmul(lhs, rhs)


class CoordinateGRUCell(nn.GRUCell):
    """flax's GRUCell with the same parameters (checkpoints are interchangeable), its matmuls coordinate-wise.

    Plain code: `nn.GRUCell(hidden_size, kernel_init=...)`. Same parameters, values and gradients, also under vmap:
    tests/test_train_lopt.py::test_coordinate_gru_matches_flax_gru.
    """

    @nn.compact
    def __call__(self, carry, inputs):
        h = carry
        dense = partial(nn.Dense, h.shape[-1], bias_init=self.bias_init, dot_general=coordinate_dot_general)
        dense_h = partial(dense, use_bias=False, kernel_init=self.recurrent_kernel_init)
        dense_i = partial(dense, kernel_init=self.kernel_init)
        r = self.gate_fn(dense_i(name="ir")(inputs) + dense_h(name="hr")(h))
        z = self.gate_fn(dense_i(name="iz")(inputs) + dense_h(name="hz")(h))
        n = self.activation_fn(dense_i(name="in")(inputs) + r * dense_h(name="hn", use_bias=True)(h))
        h = (1.0 - z) * n + z * h
        return h, h


class Conv2x2(nn.Module):
    """`nn.Conv(features, (2, 2))` (SAME padding, same parameters and init), computed as patches @ kernel.

    Plain code: `nn.Conv(features, (2, 2))`. Agents are vmapped with one kernel each, which XLA:CPU lowers to a
    grouped convolution, far slower than this matmul form. Same parameters and output:
    tests/test_train_lopt.py::test_conv2x2_matches_flax_conv.
    """

    features: int

    @nn.compact
    def __call__(self, x):  # (batch, H, W, C)
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (2, 2, x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        height, width = x.shape[1:3]
        padded = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))  # SAME for a 2x2 kernel pads after, by one
        patches = jnp.concatenate([padded[:, i : i + height, j : j + width] for i in (0, 1) for j in (0, 1)], -1)
        return patches @ kernel.reshape(-1, self.features) + bias


# ================================================================================================
# Plumbing: checkpoints, time limit, metrics, plots, main; a reader of the method can skip this
# ================================================================================================

# --- Checkpoints and devices ---


def run_dir(args: Args) -> str:
    return os.path.join(args.out_dir, args.run_name or f"{args.env_group}_{args.lopt}_s{args.seed}")


def resume_settings(args: Args) -> dict:
    """Settings that must not change when a run is resumed: every Args field not annotated MayChange."""
    hints = get_type_hints(Args, include_extras=True)
    may_change = {name for name, hint in hints.items() if MayChange in getattr(hint, "__metadata__", ())}
    return {k: v for k, v in dataclasses.asdict(args).items() if k not in may_change}


def changed_settings(saved: dict, args: Args) -> list[str]:
    """The resume_settings that differ from a saved run's. A setting the saved run predates counts as the field's
    default, so adding a flag with a default does not stop older runs from resuming."""
    defaults = {field.name: field.default for field in dataclasses.fields(Args)}
    return sorted(k for k, v in resume_settings(args).items() if saved.get(k, defaults[k]) != v)


TRAIN_STATE = "train_state.npy"  # the whole MetaState, for --resume: a JSON header, then its leaves
VALIDATED = "validated"  # every validated optimizer, as optimizer_<meta-step>.msgpack: candidates for a wider selection


def optimizer_checkpoint(args: Args, lopt_params, init_params, meta_step: int, **extra) -> dict:
    """What optimizer.msgpack holds: the network's config and parameters, and how they were made."""
    return {"config": lopt_config(args), "params": lopt_params, "init_params": init_params, "meta_step": meta_step,
            "command": recorded("python train_lopt.py " + " ".join(sys.argv[1:])),
            "settings": json.dumps(recorded(dataclasses.asdict(args))), **extra}


def read_optimizer_checkpoint(path: str) -> dict:
    """Checkpoint dict with 'config', 'params', 'init_params'; a missing, corrupt or foreign file is a UserError."""
    tree = load_msgpack(path)
    config = tree.get("config")
    if not isinstance(config, dict) or config.get("lopt") not in LOPTS or "params" not in tree:
        raise UserError(f"{path} is not a learned-optimizer checkpoint of this project")
    config = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in config.items()}
    try:
        template = init_lopt_params(make_lopt_net(config), jax.random.PRNGKey(0), config.get(STEP_SCHEDULE, 0))
        restore = lambda params: serialization.from_state_dict(template, params)  # noqa: E731
        params = restore(tree["params"])
        init_params = restore(tree.get("init_params", tree["params"]))
        shapes_match = jax.tree.map(lambda a, b: np.shape(a) == np.shape(b), template, params)
        if not all(jax.tree.leaves(shapes_match)):
            raise ValueError("parameter shapes differ from the config's network")
    except Exception as error:  # whatever a malformed file breaks, the user needs the file's name
        raise UserError(f"{path} does not match the network it describes ({type(error).__name__}: {error})")
    val_score = tree.get("val_score")  # in optimizer_best.msgpack: the validation score that made it the best
    return {"config": config, "params": params, "init_params": init_params, "meta_step": int(tree.get("meta_step", 0)),
            "val_score": None if val_score is None else float(val_score)}


def host_copy(tree):
    """A replicated pytree on the host; with several processes, gathered first (every process must call this)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        tree = multihost_utils.process_allgather(tree)
    return jax.device_get(tree)


def population_sharding(size: int, flag: str) -> NamedSharding:
    """Split a leading axis of `size` agents (or seeds) evenly over all visible devices, on all hosts."""
    devices = jax.device_count()
    if size % devices:
        raise UserError(f"{flag} {size} must be a multiple of the device count ({devices})")
    # Auto axis: XLA propagates the split through the vmapped agents and inserts the meta-gradient's all-reduce.
    mesh = jax.make_mesh((devices,), ("population",), axis_types=(jax.sharding.AxisType.Auto,))
    return NamedSharding(mesh, PartitionSpec("population"))


class Checkpointer:
    """Each save copies the train state (the whole population: large at the paper's scale) to the host; a background
    thread then writes it, and optimizer.msgpack (small and portable), while meta-training goes on.

    Both writes are atomic. The state goes out in numpy's .npy format, a copy and a write, so a save takes little
    CPU from meta-training (why not orbax: docs/design.md; benchmarks/bench_checkpoint.py).
    """

    def __init__(self, folder: str, args: Args):
        self.folder, self.args = folder, args
        self.writer = ThreadPoolExecutor(max_workers=1)
        self.pending = None  # the background write in progress
        self.buffers = None  # host copies of the state's leaves, reused by every save
        self.blocked_s = 0.0  # the longest a save has held up meta-training

    def save(self, state: MetaState, init_params, bad_steps: int) -> None:
        start, step = time.time(), int(state.meta_step)
        self.wait()
        host = host_copy(state)
        if jax.process_index() == 0:
            leaves = self._own_copies(list(map(np.asarray, jax.tree.leaves(host))))
            header = {"settings": resume_settings(self.args), "bad_steps": bad_steps, "meta_step": step}
            optimizer = optimizer_checkpoint(self.args, host.lopt_params, init_params, step)
            self.pending = self.writer.submit(self._write, header, leaves, optimizer)
        self.blocked_s = max(self.blocked_s, time.time() - start)

    def _own_copies(self, leaves: list[np.ndarray]) -> list[np.ndarray]:
        """On a CPU the host arrays are views of the device buffers, which the next meta-step donates: copy those,
        into buffers kept from save to save (fresh ones would cost page faults at every save)."""
        if self.buffers is None or [b.shape for b in self.buffers] != [x.shape for x in leaves]:
            self.buffers = [np.empty_like(x) for x in leaves]
        for buffer, x in zip(self.buffers, leaves):
            if not x.flags.owndata:
                np.copyto(buffer, x)
        return [x if x.flags.owndata else buffer for buffer, x in zip(self.buffers, leaves)]

    def _write(self, header: dict, leaves: list[np.ndarray], optimizer: dict) -> None:
        # In the background, fsyncs included: they wait for the disk.
        save_arrays(os.path.join(self.folder, TRAIN_STATE), header, leaves)
        save_msgpack(os.path.join(self.folder, "optimizer.msgpack"), optimizer)

    def restore(self, template: MetaState) -> tuple[MetaState, int]:
        """The saved train state as host arrays shaped like `template`; a run with other settings is a UserError."""
        path = os.path.join(self.folder, TRAIN_STATE)
        header, leaves = load_arrays(path)
        changed = changed_settings(header["settings"], self.args)
        if changed:
            raise UserError(f"cannot resume {path}: settings differ from the saved run ({', '.join(changed)})")
        expected = [(np.shape(x), np.dtype(x.dtype)) for x in jax.tree.leaves(template)]
        if [(x.shape, x.dtype) for x in leaves] != expected:
            raise UserError(f"cannot resume {path}: the saved state does not match this program's")
        return jax.tree.unflatten(jax.tree.structure(template), leaves), int(header["bad_steps"])

    def wait(self) -> None:
        """Block until the background write is on disk; a failed write raises here."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        """A run that ends, or is interrupted, leaves its last save complete."""
        try:
            self.wait()
        finally:
            self.writer.shutdown()


# --- Baseline cache ---

# The learner's code, hashed once at import: part of the baseline cache's key (see BaselineCache).
SOURCE_DIGEST = hashlib.sha1(b"".join(pathlib.Path(__file__).with_name(f).read_bytes()
                                      for f in ("train_lopt.py", "common.py", "open_optimizer.py"))).hexdigest()[:12]


class BaselineCache:
    """Per-seed final returns of the baselines, one JSON file per (task, budget, seeds, learner settings, code), so a
    second run (or validation and the final evaluation of one run) does not train them again.

    The key hashes this file and common.py too: a fork that changes the learner never reads stale baselines.
    """

    def __init__(self, folder: str | None):
        self.folder = folder

    def _path(self, evaluator: TaskEvaluator, stream: int, num_seeds: int) -> str | None:
        if self.folder is None:
            return None
        a = evaluator.args
        settings = dict(task=evaluator.name, steps=evaluator.steps, stream=stream, seeds=num_seeds,
                        envs=a.eval_envs, rollout_steps=a.rollout_steps, gamma=a.gamma, gae_lambda=a.gae_lambda,
                        entropy_coef=a.entropy_coef, grad_clip=evaluator.config["grad_clip"], jax=jax.__version__,
                        devices=jax.device_count(), code=SOURCE_DIGEST)
        digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
        return os.path.join(self.folder, f"{evaluator.name}_{evaluator.steps}_{stream}_{num_seeds}_{digest}.json")

    def returns(self, evaluator: TaskEvaluator, kind: str, stream: int, num_seeds: int, lrs) -> dict:
        """{lr: per-seed final returns} of a baseline, training only the learning rates not cached yet."""
        path = self._path(evaluator, stream, num_seeds)
        cached = json.loads(pathlib.Path(path).read_text()) if path and os.path.exists(path) else {}
        done = {float(lr): np.asarray(v, float) for lr, v in cached.get(kind, {}).items()}
        missing = [lr for lr in lrs if float(lr) not in done]
        if missing:
            keys = evaluation_keys(evaluator.name, stream, num_seeds, STREAM_FLAGS[stream])
            done.update(zip(map(float, missing), evaluator.returns(kind, keys, missing)))
            if path and jax.process_index() == 0:
                cached[kind] = {repr(lr): [None if x != x else float(x) for x in v] for lr, v in done.items()}
                atomic_write(path, lambda f: f.write(json.dumps(cached).encode()))
        return {float(lr): done[float(lr)] for lr in lrs}



# --- Time limit ---


_compiled_s = [0.0]  # seconds spent tracing, lowering and compiling programs in this process so far
COMPILE_EVENTS = {"/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration"}  # jax.monitoring's names; they do not overlap


def _count_compilation(event: str, seconds: float, **_) -> None:
    if event in COMPILE_EVENTS:
        _compiled_s[0] += seconds


jax.monitoring.register_event_duration_secs_listener(_count_compilation)


def compile_seconds() -> float:
    return _compiled_s[0]


RESERVE_SLACK, FINISH_S = 1.25, 3.0  # the evaluation's measured cost x 1.25, + writing eval.json and the plot


class Deadline:
    """--time-limit as a wall for the whole command: whether a piece of work of a given length still fits, with
    `reserve` seconds kept free for what must follow it (the learned optimizer's evaluation, timed beforehand)."""

    def __init__(self, limit: float | None, start: float):
        self.limit, self.start, self.reserve = limit, start, 0.0
        self.compile_s, self.s_per_work = 0.0, 0.0  # the longest compilation, the slowest run per unit of work

    def left(self) -> float:
        return math.inf if self.limit is None else self.limit - (time.time() - self.start)

    def allows(self, seconds: float) -> bool:
        return seconds + self.reserve <= self.left()

    def record(self, compile_s: float, run_s: float, work: int) -> None:
        self.compile_s, self.s_per_work = max(self.compile_s, compile_s), max(self.s_per_work, run_s / work)

    def estimate(self, run_s: float | None, work: int) -> float:
        """A run's expected seconds: a program that ran before takes its measured time; a new one the longest
        compilation so far plus its work at the slowest rate so far (the first run of the command has nothing to go
        by: 0)."""
        return run_s if run_s is not None else self.compile_s + self.s_per_work * work

    def check(self, run_s: float | None, work: int, what: str) -> None:
        """Raise OutOfTime where a run would end past the deadline (its time as `estimate` gives it)."""
        estimate = self.estimate(run_s, work)
        if not self.allows(estimate):
            raise OutOfTime(f"{what} needs ~{estimate:.0f}s, {max(self.left() - self.reserve, 0):.0f}s left")


# --- Metrics, plots and the evaluation report ---


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def write_metrics(path: str, rows: list[dict], append: bool = False) -> None:
    """metrics.csv: one row per log line; the header comes from the first row ever written. A failed write (a full
    disk) is a UserError; --resume drops rows newer than the train state, so a torn last row does not stay."""
    new_file = not append or not os.path.exists(path) or os.path.getsize(path) == 0
    try:
        with open(path, "a" if append else "w", newline="") as f:
            if rows:
                writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                if new_file:
                    writer.writeheader()
                writer.writerows(rows)
    except OSError as error:
        raise UserError(f"cannot write {path}: {error.strerror or error}") from None


def metrics_row(done, steps_per_meta_step, bad_steps, returns, meta_losses, task_names, val_score,
                diagnostics=None, lopt_lr=1.0) -> dict:
    """One metrics.csv row; every row has every column (empty where nothing was measured).

    Per task: the population's return, the meta-loss and its terms (policy, value, entropy, unweighted), and
    step_ratio: the mean absolute change of a moving parameter per update over lopt_lr, which is 1 for sign-SGD.
    """
    row = {"meta_step": done, "env_steps": done * steps_per_meta_step, "time": time.time(), "bad_steps": bad_steps}
    row.update({f"return/{t}": returns.get(t, "") for t in task_names})
    row.update({f"meta_loss/{t}": meta_losses.get(t, "") for t in task_names})
    diagnostics = diagnostics or {}
    for name in ("policy", "value", "entropy"):
        row.update({f"meta_{name}/{t}": diagnostics[t][name] if t in diagnostics else "" for t in task_names})
    row.update({f"step_ratio/{t}": diagnostics[t]["step"] / lopt_lr if t in diagnostics else "" for t in task_names})
    row["val_score"] = "" if val_score is None else val_score
    return row


def plot_metrics(csv_path: str, png_path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(csv_path)
    if not rows:
        return

    def series(column):  # (meta-steps, values) of the rows where the column was measured
        kept = [r for r in rows if r.get(column, "") != ""]
        return [int(r["meta_step"]) for r in kept], [float(r[column]) for r in kept]

    tasks = [k[len("return/"):] for k in rows[0] if k.startswith("return/")]
    fig, grid = plt.subplots(2, 3, figsize=(16, 8))
    axes = grid[0]
    for i, t in enumerate(tasks):
        color = f"C{i}"  # one colour per task in every panel
        axes[0].plot(*series(f"return/{t}"), color=color, label=t)
        axes[1].plot(*series(f"meta_loss/{t}"), color=color, label=t)
        for style, name in (("-", "policy"), ("--", "value"), (":", "entropy")):
            grid[1, 0 if name != "value" else 1].plot(*series(f"meta_{name}/{t}"), style, color=color,
                                                      label=f"{t} {name}")
        grid[1, 2].plot(*series(f"step_ratio/{t}"), color=color, label=t)
    grid[1, 0].set(xlabel="meta-step", ylabel="term of the meta-loss (unweighted)", title="policy and entropy terms",
                   yscale="symlog")
    grid[1, 1].set(xlabel="meta-step", ylabel="mean squared TD error", title="value term", yscale="log")
    grid[1, 2].axhline(1.0, color="gray", ls="--", lw=1, label="sign-SGD")
    grid[1, 2].set(xlabel="meta-step", ylabel="mean |change| of a moving parameter per update / lopt_lr",
                   title="the optimizer's step relative to sign-SGD")
    for ax in grid[1]:
        ax.legend(fontsize=7)
    axes[0].set(xlabel="meta-step", ylabel="mean episode return (population, per log interval)",
                title="agents during meta-training")
    axes[1].set(xlabel="meta-step", ylabel="meta-loss", title="meta-loss per task", yscale="symlog")
    axes[0].legend(fontsize=7)
    steps, scores = series("val_score")
    if scores:
        best = int(np.argmax(scores))
        axes[2].plot(steps, scores, "o-", label="validation score")
        axes[2].plot(steps[best], scores[best], "r*", markersize=14, label=f"best (meta-step {steps[best]})")
        axes[2].axhline(1.0, color="gray", ls="--", lw=1, label="Adam")
        axes[2].legend(fontsize=7)
    axes[2].set(xlabel="meta-step", ylabel="normalised return (0 random, 1 Adam)", title="validation")
    fig.tight_layout()
    fig.savefig(png_path, dpi=90)
    plt.close(fig)


def format_lr(lr) -> str:
    """3e-3, 3.33e-3: the digits an extended grid's lr has, none more."""
    if lr is None:
        return ""
    mantissa, exponent = f"{lr:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def format_eval_table(results: dict, lopt_step: int, args: Args) -> str:
    summary = summarize(results)
    tasks = list(results)
    interval = lambda s: "n/a" if s[0] != s[0] else f"{s[0]:.2f} [{s[1]:.2f}, {s[2]:.2f}]"  # noqa: E731
    rows = [["optimizer", *tasks, f"informative tasks ({len(summary['informative_tasks'])})"]]
    for name in summary["per_task"][tasks[0]]:
        cells = [f"{interval(summary['per_task'][t][name])} @ {format_lr(results[t]['lr'][name]) or '-'}"
                 for t in tasks]
        rows.append([name, *cells, interval(summary["aggregate"][name]) if summary["aggregate"] else "none"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [f"normalised final return (0 = random policy, 1 = tuned Adam): IQM over {args.eval_seeds} evaluation "
             f"seeds [95% stratified-bootstrap CI] @ lr, each lr picked on {args.val_seeds} validation seeds",
             f"lopt: meta-step {lopt_step} at its meta-trained lr; lopt_tuned: at its best lr; lopt_init: meta-step 0; "
             "sign_sgd: lopt_init's update rule at its best lr"]
    lines += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
              for row in rows]
    for t in tasks:
        r = results[t]["returns"]
        note = "" if t in summary["informative_tasks"] else " (tuned Adam ~ random: not informative, left out)"
        lines.append(f"{t}: mean final return adam {np.mean(r['adam']):.2f}, random {np.mean(r['random']):.2f}{note}")
    return "\n".join(lines)


def write_eval(folder: str, args: Args, results: dict, lopt_path: str, lopt_step: int) -> dict:
    """eval.json: per-seed final returns, the learning rates picked and their sweeps, IQM and intervals."""
    finite = lambda v: None if v is None or v != v or abs(v) == math.inf else float(v)  # noqa: E731  (JSON: no NaN)
    summary = summarize(results)
    report = {
        "tasks": {t: {"returns": {n: [finite(x) for x in v] for n, v in r["returns"].items()},
                      "lr": r["lr"],
                      "lr_sweep": {k: {repr(lr): finite(s) for lr, s in sweep.items()}
                                   for k, sweep in r["lr_sweep"].items()},
                      "normalized_iqm_ci": {n: [finite(x) for x in s] for n, s in summary["per_task"][t].items()},
                      "adam_beats_random": t in summary["informative_tasks"]}
                  for t, r in results.items()},
        "aggregate": {"tasks": summary["informative_tasks"],
                      "normalized_iqm_ci": {n: [finite(x) for x in s] for n, s in summary["aggregate"].items()}},
        "eval_seeds": args.eval_seeds, "val_seeds": args.val_seeds, "eval_steps": args.eval_steps,
        "eval_envs": args.eval_envs, "lopt_path": recorded(lopt_path), "lopt_meta_step": lopt_step,
    }
    os.makedirs(folder, exist_ok=True)
    atomic_write(os.path.join(folder, "eval.json"), lambda f: f.write(json.dumps(report, indent=1).encode()))
    return report


# --- The meta-training loop, and main ---


class MetaTrainResult(NamedTuple):
    lopt_params: Any  # after the last meta-step run
    init_params: Any  # at meta-step 0
    best_params: Any  # the best-validated parameters (the last ones without validation)
    best_step: int
    best_score: float | None  # validation score of best_params (None without validation)
    meta_step: int  # meta-steps done; below --meta-steps when --time-limit stopped the run


def check_run_folder(args: Args, folder: str) -> None:
    """--resume needs a saved run in the folder, and a new run an empty one (checked before anything compiles)."""
    state_path, older = os.path.join(folder, TRAIN_STATE), os.path.join(folder, "train_state.msgpack")
    if args.resume and not os.path.exists(state_path):
        note = " (train_state.msgpack is from an older version of this script)" if os.path.exists(older) else ""
        raise UserError(f"cannot resume {folder}: no saved train state {state_path}{note}")
    if not args.resume and (os.path.exists(state_path) or os.path.exists(older)):
        raise UserError(f"{folder} already holds a run; pass --resume to continue it or choose another --run-name")


def validated_path(folder: str, meta_step: int) -> str:
    """Where meta-training keeps the optimizer it validated at this meta-step (with its score)."""
    return os.path.join(folder, VALIDATED, f"optimizer_{meta_step:05d}.msgpack")


def meta_train(args: Args, task_names, folder: str, deadline: Deadline | None = None,
               evaluators: Evaluators | None = None) -> MetaTrainResult:
    """Meta-train, validating and checkpointing as asked; stops early only at the deadline (--time-limit, keeping
    its reserve free) or for bad meta-steps, or on SIGINT/SIGTERM: then after the meta-step in progress, saving, and
    raising Interrupted."""
    deadline = deadline or Deadline(args.time_limit, time.time())
    check_run_folder(args, folder)
    state_path = os.path.join(folder, TRAIN_STATE)
    init, meta_step, state_sharding, *_ = make_meta_train(args, task_names)
    state = init(jax.random.PRNGKey(args.seed))
    init_params = host_copy(state.lopt_params)  # meta_step donates the state's buffers
    metrics_path, best_path = os.path.join(folder, "metrics.csv"), os.path.join(folder, "optimizer_best.msgpack")
    os.makedirs(os.path.join(folder, VALIDATED), exist_ok=True)
    # With several processes a signal may reach them at different meta-steps, and one stopping alone would leave
    # the others waiting in a collective: there the signals keep their usual effect.
    with Checkpointer(folder, args) as checkpointer, StopSignals(enabled=jax.process_count() == 1) as stop:
        bad_steps_total, best = 0, None  # best: (score, meta-step, parameters)
        if args.resume:
            state, bad_steps_total = checkpointer.restore(state)
            state = jax.jit(lambda s: s, out_shardings=state_sharding)(state)  # host arrays -> sharded, on every host
            if os.path.exists(metrics_path):  # drop rows logged after the checkpoint
                write_metrics(metrics_path, [r for r in read_metrics(metrics_path)
                                             if int(r["meta_step"]) <= int(state.meta_step)])
            init_params = read_optimizer_checkpoint(os.path.join(folder, "optimizer.msgpack"))["init_params"]
            if os.path.exists(best_path):  # it may be newer than the train state: it was validated all the same
                saved = read_optimizer_checkpoint(best_path)
                best = (saved["val_score"], saved["meta_step"], saved["params"])
            print(f"resumed {folder} at meta-step {int(state.meta_step)}")
        else:
            write_metrics(metrics_path, [])
            with open(os.path.join(folder, "args.json"), "w") as f:
                json.dump(dataclasses.asdict(args), f, indent=2)
        validator, val_s = None, 0.0
        if args.val_every:
            try:
                validator = Validator(args, task_names, evaluators, deadline)
            except OutOfTime as late:
                print(f"--time-limit {args.time_limit:g}s: no validation ({late}); the last optimizer is kept")
        if validator and args.time_limit is not None:  # measured at each validation; resumed, the first one is
            val_s = validator.seconds(deadline)  # due mid-loop, before it has run in this process: estimated

        def validate(done: int, lopt_params, deadline: Deadline | None = None) -> float:
            """Score the parameters; keep them as optimizer_best.msgpack (atomically) if they beat the best so far."""
            nonlocal best, val_s
            start = time.time()
            score = validator(lopt_params, deadline)
            val_s = time.time() - start
            params = host_copy(lopt_params)
            if jax.process_index() == 0:  # every validated optimizer is a candidate for a later, wider selection
                save_msgpack(validated_path(folder, done),
                             optimizer_checkpoint(args, params, init_params, done, val_score=score))
            if math.isfinite(score) and (best is None or score > best[0]):  # diverged agents score NaN: never the best
                best = (score, done, params)
                if jax.process_index() == 0:
                    save_msgpack(best_path, optimizer_checkpoint(args, params, init_params, done, val_score=score))
            return score

        steps_per_meta_step = env_steps_per_meta_step(args) * len(task_names)
        print(f"meta-training {args.lopt} on {', '.join(task_names)}: {args.num_agents} agents/task, "
              f"{args.meta_steps} meta-steps, {steps_per_meta_step} env steps per meta-step, on "
              f"{jax.device_count()} {jax.devices()[0].device_kind} device(s) (jax {jax.__version__})")
        if validator and best is None:
            try:
                score = validate(int(state.meta_step), state.lopt_params, deadline)
                print(f"validation at meta-step {int(state.meta_step)}: {score:.2f} ({format_duration(val_s)})")
                row = metrics_row(int(state.meta_step), steps_per_meta_step, bad_steps_total, {}, {}, task_names,
                                  score)
                write_metrics(metrics_path, [row], append=True)
            except OutOfTime as late:
                print(f"--time-limit {args.time_limit:g}s: no validation ({late}); the last optimizer is kept")
                validator = None
        consecutive_bad, compile_start, step_s = 0, time.time(), None
        timer_start, timer_step = None, None
        # Summed over the meta-steps since the last log line: one meta-step ends only a few episodes per task.
        # Per task: return sum, count, loss sum, then the sums of the META_DIAGNOSTICS.
        window, step_logged = np.zeros((len(task_names), 3 + len(META_DIAGNOSTICS))), int(state.meta_step)
        done = int(state.meta_step)
        last_saved = done if args.resume else None  # a new run has no train state to resume from yet
        for step in range(int(state.meta_step), args.meta_steps):
            if stop.signum is not None:
                break
            next_val = validator and ((step + 1) % args.val_every == 0 or step + 1 == args.meta_steps)
            # Before the first meta-step, whose compilation is to come, the longest compilation so far stands for it.
            needed = (deadline.compile_s if step_s is None else step_s) + checkpointer.blocked_s + (
                val_s if next_val else 0.0)
            if not deadline.allows(needed):
                kept = f", keeping {deadline.reserve:.0f}s for the evaluation" if deadline.reserve else ""
                print(f"--time-limit {args.time_limit:g}s: stopped after meta-step {done} of {args.meta_steps}"
                      f"{kept}; --resume continues the run")
                break
            step_start, compiled_before = time.time(), compile_seconds()
            state, metrics = meta_step(state)
            metrics = jax.device_get(metrics)
            step_s = max(time.time() - step_start - (compile_seconds() - compiled_before), 0.0)  # less compilation
            window += [[m["return_sum"], m["return_count"], m["meta_loss"], *m["diagnostics"]] for m in metrics["tasks"]]
            if timer_start is None:  # the first step includes compilation
                print(f"compiled and ran the first meta-step in {time.time() - compile_start:.0f}s")
                timer_start, timer_step = time.time(), step + 1
            consecutive_bad = 0 if metrics["grad_finite"] else consecutive_bad + 1
            bad_steps_total += int(not metrics["grad_finite"])
            if consecutive_bad >= args.max_bad_steps:
                raise UserError(
                    f"{consecutive_bad} consecutive non-finite meta-gradients at meta-step {step + 1}; stopped. "
                    f"The last good checkpoint in {folder} is intact (try a lower --meta-lr)."
                )
            done = step + 1
            score = validate(done, state.lopt_params) if next_val else None
            if done % args.log_every == 0 or done == args.meta_steps or next_val:
                returns = {t: w[0] / max(w[1], 1) for t, w in zip(task_names, window)}
                meta_losses = {t: w[2] / (done - step_logged) for t, w in zip(task_names, window)}
                diagnostics = {t: dict(zip(META_DIAGNOSTICS, w[3:] / (done - step_logged)))
                               for t, w in zip(task_names, window)}
                row = metrics_row(done, steps_per_meta_step, bad_steps_total, returns, meta_losses, task_names, score,
                                  diagnostics, args.lopt_lr)
                write_metrics(metrics_path, [row], append=True)
                elapsed = time.time() - timer_start
                rate = (done - timer_step) / elapsed if elapsed > 0 and done > timer_step else float("nan")
                eta = (args.meta_steps - done) / rate if rate == rate and rate > 0 else float("nan")
                best_text = f" (best {best[0]:.2f} @ {best[1]})" if best else ""
                val_text = f" | val {score:.2f} in {format_duration(val_s)}{best_text}" if score is not None else ""
                speed = f"{rate * steps_per_meta_step:,.0f}" if rate == rate else "?"  # ? until a step is timed
                print(
                    f"meta-step {done}/{args.meta_steps} | {speed} env steps/s | "
                    f"meta-loss {np.mean(list(meta_losses.values())):.3g} | return "
                    + " ".join(f"{t}={r:.2f}" for t, r in returns.items())
                    + f"{val_text} | bad {bad_steps_total} | ETA {format_duration(eta) if eta == eta else '?'}",
                    flush=True,
                )
                window[:], step_logged = 0.0, done
            if done % args.save_every == 0 or done == args.meta_steps:
                checkpointer.save(state, init_params, bad_steps_total)
                last_saved = done
        if done != last_saved:  # stopped by --time-limit or a signal between two checkpoints
            checkpointer.save(state, init_params, bad_steps_total)
        if stop.signum is not None:
            checkpointer.wait()
            raise Interrupted(f"interrupted by {stop.name} after meta-step {done} of {args.meta_steps}: saved "
                              f"{folder}; continue with the same command and --resume", stop.signum)
        if os.path.getsize(metrics_path) > 0:
            plot_metrics(metrics_path, os.path.join(folder, "meta_training.png"))
        lopt_params = host_copy(state.lopt_params)
        if best is None:
            return MetaTrainResult(lopt_params, init_params, lopt_params, done, None, done)
        return MetaTrainResult(lopt_params, init_params, best[2], best[1], best[0], done)


def main(args: Args, clock_start: float | None = None) -> None:
    deadline = Deadline(args.time_limit, time.time() if clock_start is None else clock_start)
    check_settings(args)
    if args.distributed:
        jax.distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    task_names = ENV_GROUPS[args.env_group]
    eval_task_names = meta_task_names(args, task_names) if args.eval_tasks == "meta" else task_names  # --eval-tasks
    folder, evaluators = run_dir(args), Evaluators(args)
    if args.eval_only:
        if not args.lopt_path:
            raise UserError("--eval-only needs --lopt-path <optimizer.msgpack>")
        ckpt = read_optimizer_checkpoint(args.lopt_path)
        config, lopt_params, init_params = ckpt["config"], ckpt["params"], ckpt["init_params"]
        lopt_path, lopt_step = args.lopt_path, ckpt["meta_step"]
        folder = os.path.join(args.out_dir, args.run_name or f"eval_{args.env_group}")
    else:
        check_run_folder(args, folder)
        config = lopt_config(args)
        init_params = initial_lopt_params(args)
    evaluation = FinalEvaluation(args, eval_task_names, config, evaluators) if args.final_eval else None
    start, skipped = time.time(), False
    if evaluation:
        # Before meta-training, so that the rest of the evaluation has a measured cost for --time-limit to keep.
        print(f"evaluating the baselines on {', '.join(eval_task_names)}: {args.eval_seeds} seeds x "
              f"{args.eval_steps:,} env steps per optimizer; learning rates tuned on {args.val_seeds} validation seeds")
        try:
            evaluation.prepare(init_params, deadline)
            if not deadline.allows(evaluation.seconds() * RESERVE_SLACK + FINISH_S):
                raise OutOfTime(f"the learned optimizer's part needs ~{evaluation.seconds():.0f}s")
        except OutOfTime as late:
            if args.eval_only:
                raise UserError(f"--time-limit {args.time_limit:g}s: the evaluation does not fit ({late})") from None
            print(f"--time-limit {args.time_limit:g}s: the final evaluation does not fit ({late}); it is skipped, "
                  "and meta-training takes the time left")
            evaluation, skipped = None, True
        else:
            deadline.reserve = evaluation.seconds() * RESERVE_SLACK + FINISH_S
            print(f"baselines took {format_duration(time.time() - start)}; the learned optimizer's part will take "
                  f"at most {format_duration(evaluation.seconds())}")
        baselines_s = time.time() - start
    if not args.eval_only:
        start = time.time()
        result = meta_train(args, meta_task_names(args, task_names), folder, deadline, evaluators)
        lopt_params, lopt_step = result.best_params, result.best_step
        best = result.best_score is not None
        lopt_path = os.path.join(folder, "optimizer_best.msgpack" if best else "optimizer.msgpack")
        print(f"meta-training took {format_duration(time.time() - start)} ({result.meta_step} meta-steps); "
              + (f"best validation score {result.best_score:.2f} at meta-step {result.best_step}: " if best else "")
              + f"optimizer saved to {lopt_path}")
    if skipped:
        print(f"skipped the final evaluation (--time-limit); run it with the same flags and --eval-only --lopt-path "
              f"{lopt_path}")
    if evaluation is None:
        return
    print(f"evaluating {lopt_path} (meta-step {lopt_step})")
    start = time.time()
    results = evaluation.finish(lopt_params)
    write_eval(folder, args, results, lopt_path, lopt_step)
    print(format_eval_table(results, lopt_step, args))
    print(f"evaluation took {format_duration(baselines_s + time.time() - start)} (the learned optimizer's part "
          f"{format_duration(time.time() - start)}); wrote {os.path.join(folder, 'eval.json')}")


def check_settings(args: Args) -> None:
    """Reject careless values before anything compiles: one line naming the flag, the value and what is allowed."""
    check_args(args, positive=("num_agents", "agents_per_chunk", "num_envs", "inner_updates", "rollout_steps",
                               "reset_interval", "meta_steps", "meta_lr", "meta_grad_clip", "lopt_lr", "hidden_size",
                               "save_every", "log_every", "time_limit", "val_seeds", "val_steps", "eval_seeds",
                               "eval_steps", "eval_envs", "max_bad_steps", "pes_sigma"),
               non_negative=("grad_clip", "entropy_coef", "val_every"),
               unit_interval=("gamma", "gae_lambda"))
    if not args.step_spread >= 1:  # also rejects nan
        raise UserError(f"--step-spread {args.step_spread}: must be >= 1 (1: one step size per tensor; inf: unbounded)")
    if not 0 <= args.grad_scale_range < math.inf:
        raise UserError(f"--grad-scale-range {args.grad_scale_range}: must be a finite number of decades >= 0 (0: off)")
    if args.step_schedule == 1 or args.step_schedule < 0:
        raise UserError(f"--step-schedule {args.step_schedule}: must be 0 (no schedule) or >= 2 knots")
    agents_per_chunk(args)
    for prefix in ("eval", "val"):
        steps, envs = getattr(args, f"{prefix}_steps"), args.eval_envs
        if steps < args.rollout_steps * envs:
            raise UserError(f"--{prefix}-steps {steps}: must be at least one rollout per agent (--rollout-steps x "
                            f"--eval-envs = {args.rollout_steps * envs})")
    check_writable_dir(args.out_dir)


def parse_args(argv: list[str] | None = None) -> Args:
    """Presets set defaults; flags given on the command line override them."""
    argv = sys.argv[1:] if argv is None else argv
    preset = "cpu"
    for i, a in enumerate(argv):
        if a == "--preset" and i + 1 < len(argv):
            preset = argv[i + 1]
        elif a.startswith("--preset="):
            preset = a.split("=", 1)[1]
    defaults = Args(**PRESETS.get(preset, {}))  # an unknown preset is reported by tyro below
    return tyro.cli(Args, args=argv, default=defaults, description=__doc__.split("\n")[0])


if __name__ == "__main__":
    CLOCK_START = time.time()  # --time-limit counts from here (imports take a few seconds more)
    run_cli(lambda: main(parse_args(), CLOCK_START))
