"""Is the truncated meta-gradient signal or noise? Split-half cosines at fixed optimizer parameters.

    python benchmarks/meta_gradient_signal.py      # writes results/meta_gradient_signal.json

At the optimizer's parameters of meta-step 0 (sign-SGD; --lopt-path for another), a pipeline population of
--num-agents agents per task is filled as meta-training fills it (one reset interval of meta-steps, the parameters
held fixed), then for --measure-steps meta-steps each agent's own meta-gradient is kept. For a population of n
agents per task, the meta-step's gradient (mean over agents, then over tasks, as train_lopt.py's meta-step) is
computed from two disjoint halves of n / 2 agents each, and their cosine is averaged over random splits and
meta-steps. Near 0, a meta-step of that size follows noise; near 1, it follows a direction the population agrees
on. If per-agent gradients are a mean mu plus independent noise of total variance s2, the expected cosine of two
halves of m agents is about 1 / (1 + r / m), r = s2 / |mu|^2: `agents_for` reads r off the largest population
and says how many agents per task a meta-step would need for a given cosine.

Each objective is a set of train_lopt.py flags on top of its defaults with 4 envs per agent (its default batch
before 2026-12-03): the default meta-loss (policy term in TD units), the paper's A2C loss, the default with the
evaluation's batch per agent (32 envs, 8x as many: train_lopt's default since), and that with aligned lifetimes.

Whether the direction the population agrees on points uphill on what validation scores is measured three ways:
--along (the validation's rise from steps along the truncated meta-gradient, against random directions: one
number per direction, so a few dozen agents resolve it), --against-es (the cosine with an ES estimate of the whole
gradient: needs thousands of lifetimes per estimate) and --against-pes (the lifetime-unbiased gradient of the same
meta-loss).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import tyro
from jax.flatten_util import ravel_pytree

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_lopt as tl  # noqa: E402
from common import GRIDWORLDS, UserError, atomic_write, check_args, check_choices, recorded, run_cli  # noqa: E402

SMALL_BATCH = 4  # envs per agent of the objectives but eval_batch
OBJECTIVES = {  # name -> train_lopt.Args fields that differ from its defaults (with SMALL_BATCH envs per agent)
    "default": {},
    "paper": dict(meta_value_coef=0.5, meta_loss_scale="raw"),
    "eval_batch": dict(num_envs=32),  # the default with the evaluation's batch: 32 envs x 20 steps per update
    # eval_batch with lifetimes past a 1e6 evaluation's 1,562 updates and the step's size left to meta-training
    "aligned": dict(num_envs=32, reset_interval=400, normalize_step=False),
}
TASKS = (*GRIDWORLDS, "catch")


@dataclass
class Args:
    tasks: tuple[str, ...] = ("small_dense_long", "small_dense_short")
    objectives: tuple[str, ...] = ("default", "paper")
    """of OBJECTIVES; eval_batch costs 8x per agent: run it with fewer --num-agents"""
    num_agents: int = 64
    """agents per task; the smaller populations are subsets of these"""
    sizes: tuple[int, ...] = (8, 16, 32, 64)
    """population sizes (agents per task) whose split-half cosine is reported; even, at most --num-agents"""
    warmup_steps: int | None = None
    """meta-steps that fill the pipeline before measuring (default: --reset-interval of train_lopt)"""
    measure_steps: int = 8
    splits: int = 64
    """random splits per population size and meta-step"""
    lopt_path: str | None = None
    """optimizer checkpoint whose parameters are held fixed (default: meta-step 0 of --seed)"""
    against_pes: bool = False
    """instead of split-half cosines: the truncated meta-gradient against PES's for the same meta-loss
    (measure_against_pes)"""
    pes_sigma: float = tl.Args.pes_sigma
    """--against-pes: train_lopt's --pes-sigma"""
    against_es: bool = False
    """instead of split-half cosines: the truncated meta-gradient against an ES estimate of the validation
    objective's gradient (measure_against_es)"""
    es_pairs: int = 256
    es_seeds: int = 4
    """--against-es: agents per task and ES member (the same for every member)"""
    es_sigma: float = 0.03
    es_steps: int = 100_000
    """--against-es and --along: env steps of each agent's lifetime (the validation's)"""
    es_seconds: float = 1800.0
    """--against-es: stop adding pairs (32 at a time, or --es-pairs if fewer) after this many seconds"""
    along: bool = False
    """instead of split-half cosines: the validation objective's rise from steps along the truncated meta-gradient
    and along random directions (measure_along)"""
    along_seeds: int = 32
    """--along: agents per task, the same for every evaluation"""
    along_steps: tuple[int, ...] = (10, 30)
    """--along: step lengths, in meta-steps of full size (meta-lr x sqrt(parameters) each)"""
    random_directions: int = 4
    """--along: random unit directions, the control"""
    seed: int = 0
    out: str = "results/meta_gradient_signal.json"


def cosine(a, b) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def split_half_cosines(grads: np.ndarray, size: int, splits: int, rng: np.random.Generator) -> np.ndarray:
    """grads [tasks, agents, P]: cosines between the meta-gradients of two disjoint halves of `size` agents per task
    (each the mean over its agents, then over tasks), one per random split."""
    num_tasks, num_agents, _ = grads.shape
    cosines = []
    for _ in range(splits):
        halves = [0.0, 0.0]
        for t in range(num_tasks):
            chosen = rng.permutation(num_agents)[:size]
            for h, agents in enumerate((chosen[: size // 2], chosen[size // 2:])):
                halves[h] = halves[h] + grads[t, agents].mean(0) / num_tasks
        a, b = halves
        cosines.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30)))
    return np.array(cosines)


def agents_for(cosine_at_half: float, half: int, target: float) -> float | None:
    """Agents per task a meta-step needs for an expected split-half cosine `target` between halves of that size, from
    the cosine measured between halves of `half` agents (under mean + independent noise: cos = 1 / (1 + r / m))."""
    if cosine_at_half <= 0:
        return None  # no population is enough: no agreement measured
    ratio = half * (1.0 / cosine_at_half - 1.0)  # r = s2 / |mu|^2
    return 2 * ratio * target / (1.0 - target)  # two halves of m = r c / (1 - c)


def make_per_agent(args: tl.Args, task: tl.Task, net):
    """(lopt_params, population, key, meta_step, with_grads) -> (per-agent flat meta-gradients or None, population)."""
    offsets = jnp.asarray(tl.reset_offsets(args.num_agents, args.reset_interval, args.pipeline))

    def inner_tx(lopt_params):  # as train_lopt.make_meta_train's agents use it
        return tl.clipped_learned_optimizer(net, lopt_params, args.lopt_lr, args.grad_clip, rematerialize=True,
                                            normalize_step=args.normalize_step)

    one_agent = partial(tl.agent_meta_loss, make_tx=inner_tx, inner_updates=args.inner_updates,
                        meta_value_coef=args.meta_value_coef, meta_loss_scale=args.meta_loss_scale)

    def inputs(key, meta_step):
        return jax.random.split(key, args.num_agents), tl.reset_mask(meta_step, offsets, args.reset_interval)

    @jax.jit
    def forward(lopt_params, population, key, meta_step):
        keys, reset_now = inputs(key, meta_step)
        _, aux = jax.vmap(one_agent, (None, None, 0, 0, 0))(lopt_params, task, population, keys, reset_now)
        return aux[0]

    @jax.jit
    def with_grads(lopt_params, population, key, meta_step):
        keys, reset_now = inputs(key, meta_step)
        grads, aux = jax.vmap(jax.grad(one_agent, has_aux=True), (None, None, 0, 0, 0))(
            lopt_params, task, population, keys, reset_now)
        return jax.vmap(lambda g: ravel_pytree(g)[0])(grads), aux[0]

    def init(lopt_params, key):
        tx = inner_tx(lopt_params)
        return jax.jit(jax.vmap(partial(tl.init_agent, task, tx)))(jax.random.split(key, args.num_agents))

    return init, forward, with_grads


def objective_settings(args: Args, objective: str, base: tl.Args, **extra) -> tuple[tl.Args, dict]:
    """(train_lopt settings of the objective's agents, the optimizer parameters held fixed): --lopt-path's, with its
    own network and step settings, or meta-step 0's of --seed."""
    agent_args = dataclasses.replace(base, **OBJECTIVES[objective], num_agents=args.num_agents, seed=args.seed, **extra)
    if not args.lopt_path:
        return agent_args, tl.initial_lopt_params(agent_args)
    checkpoint = tl.read_optimizer_checkpoint(args.lopt_path)
    return dataclasses.replace(agent_args, **checkpoint["config"]), checkpoint["params"]


def measure(args: Args, objective: str, base: tl.Args, log=print) -> dict:
    """The objective's split-half cosines; base: train_lopt's settings for agents and optimizer (from main: its
    defaults with SMALL_BATCH envs per agent)."""
    agent_args, lopt_params = objective_settings(args, objective, base)
    net = tl.make_lopt_net(tl.lopt_config(agent_args))
    warmup = agent_args.reset_interval if args.warmup_steps is None else args.warmup_steps
    key = jax.random.PRNGKey(args.seed)
    grads, start = [], time.time()
    for task_name in args.tasks:
        task = tl.Task.make(task_name, agent_args)
        init, forward, with_grads = make_per_agent(agent_args, task, net)
        key, key_init = jax.random.split(key)
        population = init(lopt_params, key_init)
        per_step = []
        for step in range(warmup + args.measure_steps):
            key, key_step = jax.random.split(key)
            if step < warmup:
                population = forward(lopt_params, population, key_step, step)
            else:
                g, population = with_grads(lopt_params, population, key_step, step)
                per_step.append(np.asarray(g, np.float64))
        grads.append(np.stack(per_step))  # [measure_steps, agents, P]
        log(f"  {objective} {task_name}: {warmup} + {args.measure_steps} meta-steps x {args.num_agents} agents, "
            f"{time.time() - start:.0f}s")
    grads = np.stack(grads, 1)  # [measure_steps, tasks, agents, P]
    if not np.all(np.isfinite(grads)):
        raise UserError(f"{objective}: non-finite meta-gradients; nothing written")
    rng = np.random.default_rng(args.seed)
    by_size = {}
    for size in args.sizes:
        cos = np.concatenate([split_half_cosines(g, size, args.splits, rng) for g in grads])
        per_step = cos.reshape(len(grads), args.splits).mean(1)  # meta-steps are the independent draws
        by_size[str(size)] = {"mean": float(cos.mean()),
                              "stderr": float(per_step.std(ddof=1) / np.sqrt(len(per_step))) if len(per_step) > 1
                              else None}
    largest = max(args.sizes)
    at_largest = by_size[str(largest)]["mean"]
    return {
        "flags": OBJECTIVES[objective], "num_agents": args.num_agents, "warmup_steps": warmup,
        "measure_steps": args.measure_steps, "splits": args.splits, "parameters": int(grads.shape[-1]),
        "split_half_cosine": by_size,
        "agents_per_task_for_cosine": {str(c): agents_for(at_largest, largest // 2, c) for c in (0.5, 0.9)},
        "seconds": time.time() - start,
    }


def measure_against_pes(args: Args, objective: str, base: tl.Args, log=print) -> dict:
    """Does the truncated meta-gradient point where the lifetime-unbiased one (PES, train_lopt's --meta-grad pes)
    points, for the same meta-loss? A population of --num-agents agents per task in antithetic pairs is run at fixed
    optimizer parameters as --meta-grad pes runs it (accumulating its perturbations) through the warm-up; then, at
    each of --measure-steps meta-steps, the PES estimate and the truncated meta-gradient of the same agents (summed
    over tasks) are kept. Reported: the cosine between their means over the measured steps, and for each the cosine
    between its means over the even and the odd steps (near 0: at this size it is noise, and so is the first)."""
    agent_args, lopt_params = objective_settings(args, objective, base, meta_grad="pes", pes_sigma=args.pes_sigma)
    meta = tl.make_meta_train(agent_args, tuple(args.tasks))
    warmup = agent_args.reset_interval if args.warmup_steps is None else args.warmup_steps
    state = meta.init(jax.random.PRNGKey(args.seed))
    populations, accumulators = list(state.populations), list(state.pes_accumulators)
    pes = [jax.jit(lambda *a, task=task: meta.population_pes_grad(a[0], task, *a[1:])) for task in meta.tasks]
    truncated = [jax.jit(lambda *a, task=task: meta.population_meta_grad(a[0], task, *a[1:])) for task in meta.tasks]
    key, start = jax.random.PRNGKey(args.seed + 1), time.time()
    measured = {"truncated": [], "pes": []}
    for step in range(warmup + args.measure_steps):
        sums = {"truncated": 0.0, "pes": 0.0}
        for i in range(len(meta.tasks)):
            key, key_step = jax.random.split(key)
            if step >= warmup:  # the truncated meta-gradient of these agents, before PES moves them on
                sums["truncated"] += ravel_pytree(truncated[i](lopt_params, populations[i], key_step, step)[1])[0]
            (_, (populations[i], *_)), grad, accumulators[i] = pes[i](
                lopt_params, populations[i], accumulators[i], key_step, step)
            sums["pes"] += ravel_pytree(grad)[0]
        if step >= warmup:
            for name, total in sums.items():
                measured[name].append(np.asarray(total, np.float64))
        if (step + 1) % 16 == 0:
            log(f"  pes vs truncated, {objective}: meta-step {step + 1}/{warmup + args.measure_steps}, "
                f"{time.time() - start:.0f}s")
    grads = {name: np.stack(g) for name, g in measured.items()}  # [measure_steps, P]
    if not all(np.all(np.isfinite(g)) for g in grads.values()):
        raise UserError(f"{objective}: non-finite meta-gradients; nothing written")

    return {"flags": OBJECTIVES[objective], "num_agents": args.num_agents, "pes_sigma": args.pes_sigma,
            "warmup_steps": warmup, "measure_steps": args.measure_steps,
            "cosine_truncated_pes": cosine(grads["truncated"].mean(0), grads["pes"].mean(0)),
            "even_odd_cosine": {n: cosine(g[0::2].mean(0), g[1::2].mean(0)) for n, g in grads.items()},
            "seconds": time.time() - start}


def truncated_mean_grad(agent_args: tl.Args, lopt_params, tasks, warmup: int, steps: int, seed: int) -> np.ndarray:
    """The meta-step's meta-gradient (summed over tasks, as the meta-step averages them) at fixed parameters, averaged
    over `steps` meta-steps after `warmup` that fill the pipeline."""
    meta = tl.make_meta_train(dataclasses.replace(agent_args, meta_grad="truncated"), tuple(tasks))
    populations = list(meta.init(jax.random.PRNGKey(seed)).populations)
    grad_fns = [jax.jit(lambda *a, task=task: meta.population_meta_grad(a[0], task, *a[1:])) for task in meta.tasks]
    key, total = jax.random.PRNGKey(seed + 1), 0.0
    for step in range(warmup + steps):
        for i, grad_fn in enumerate(grad_fns):
            key, key_step = jax.random.split(key)
            (_, (populations[i], *_)), grad = grad_fn(lopt_params, populations[i], key_step, step)
            if step >= warmup:
                total = total + np.asarray(ravel_pytree(grad)[0], np.float64)
    return total / steps


def validation_fitness(args: Args, agent_args: tl.Args, lopt_params):
    """(flat parameters, {task: fitness(agent_keys, members [M, P]) -> final returns [M, seeds]}): the validation
    objective as a function of the optimizer's flat parameters: fresh agents trained for --es-steps env steps at the
    evaluation's batch, scored by the evaluation's final return (the episodes of the last 10%)."""
    flat, unravel = ravel_pytree(lopt_params)
    net = tl.make_lopt_net(tl.lopt_config(agent_args))
    eval_args = dataclasses.replace(agent_args, num_envs=agent_args.eval_envs)

    def make_tx(flat_params):
        return tl.clipped_learned_optimizer(net, unravel(flat_params), agent_args.lopt_lr, agent_args.grad_clip,
                                            normalize_step=agent_args.normalize_step)

    def fitness(name):
        train = tl.make_a2c_train(tl.Task.make(name, eval_args), make_tx,
                                  args.es_steps // (agent_args.rollout_steps * agent_args.eval_envs))

        def final_return(key, flat_params):
            return_sum, return_count = train(key, flat_params)
            tail = max(1, int(round(return_sum.shape[0] * tl.FINAL_FRACTION)))
            return return_sum[-tail:].sum() / jnp.maximum(return_count[-tail:].sum(), 1)

        return jax.jit(jax.vmap(jax.vmap(final_return, (0, None)), (None, 0)))  # [members, seeds]

    return flat, {name: fitness(name) for name in args.tasks}


def measure_against_es(args: Args, objective: str, base: tl.Args, log=print) -> dict:
    """Does the truncated meta-gradient point uphill on what validation scores? The gradient of the validation
    objective (validation_fitness, both tasks) with respect to the optimizer's parameters is estimated by antithetic
    ES (--es-pairs perturbations of std --es-sigma, the same --es-seeds agents for every member), in rounds of 32
    pairs (fewer if --es-pairs is) until --es-seconds have passed; each task's return differences are divided by
    that task's return spread in the first round, so that reward scales do not weight it. Reported: the cosine
    between the ES estimate and the descent direction of the truncated meta-gradient of the objective's meta-loss
    (its mean over --measure-steps meta-steps at the same parameters), and the ES estimate's split-half cosine
    (even pairs against odd ones)."""
    agent_args, lopt_params = objective_settings(args, objective, base)
    start = time.time()
    warmup = agent_args.reset_interval if args.warmup_steps is None else args.warmup_steps
    truncated = truncated_mean_grad(agent_args, lopt_params, args.tasks, warmup, args.measure_steps, args.seed)
    log(f"  {objective}: truncated meta-gradient over {args.measure_steps} meta-steps, {time.time() - start:.0f}s")
    flat, fitness_fns = validation_fitness(args, agent_args, lopt_params)
    key = jax.random.PRNGKey(args.seed + 2000)  # agents apart from validation's and evaluation's streams
    key, key_agents = jax.random.split(key)
    agent_keys = jax.random.split(key_agents, args.es_seeds)
    contributions, scales, round_pairs = [], {}, min(32, args.es_pairs)
    while len(contributions) < args.es_pairs and (not contributions or time.time() - start < args.es_seconds):
        key, key_noise = jax.random.split(key)
        noise = np.asarray(jax.random.normal(key_noise, (round_pairs, flat.size)), np.float64)
        members = jnp.concatenate([flat + args.es_sigma * noise, flat - args.es_sigma * noise]).astype(flat.dtype)
        diff = 0.0
        for name, fn in fitness_fns.items():
            returns = np.asarray(fn(agent_keys, members), np.float64).mean(1)  # [2 pairs], mean over agents
            scales.setdefault(name, float(np.std(returns)) + 1e-8)
            diff = diff + (returns[:round_pairs] - returns[round_pairs:]) / scales[name]
        contributions.extend(diff[:, None] * noise / (2 * args.es_sigma))  # one ascent estimate per pair
        log(f"  {objective}: ES {len(contributions)} pairs x {args.es_seeds} agents x {len(args.tasks)} tasks, "
            f"{time.time() - start:.0f}s")
    contributions = np.stack(contributions)
    es_grad = contributions.mean(0)
    return {"flags": OBJECTIVES[objective], "num_agents": args.num_agents, "measure_steps": args.measure_steps,
            "es_pairs": len(contributions), "es_seeds": args.es_seeds, "es_sigma": args.es_sigma,
            "es_steps": args.es_steps,
            "cosine_truncated_descent_es_ascent": cosine(-truncated, es_grad),
            "es_split_half_cosine": cosine(contributions[0::2].mean(0), contributions[1::2].mean(0)),
            "seconds": time.time() - start}


def rise_along(plus: dict, minus: dict, at: dict, samples: int = 10_000, seed: int = 0) -> dict:
    """The validation's rise from a step along a direction, from paired returns {task: [seeds]} at theta + step,
    theta - step and theta (the same agents at all three: common random numbers): per task, the mean over seeds of
    (J+ - J-) / 2 relative to |mean J(theta)|, then the mean over tasks; with its standard error and a 95%
    stratified-bootstrap interval (each task's seeds resampled)."""
    halves = [(np.asarray(plus[t], np.float64) - np.asarray(minus[t], np.float64))
              / (2 * (abs(float(np.mean(at[t]))) + 1e-8)) for t in at]
    rng = np.random.default_rng(seed)
    resampled = np.mean([h[rng.integers(0, h.size, (samples, h.size))].mean(1) for h in halves], 0)
    low, high = np.percentile(resampled, [2.5, 97.5])
    stderr = np.sqrt(sum(h.var(ddof=1) / h.size for h in halves)) / len(halves)
    return {"rise": float(np.mean([h.mean() for h in halves])), "stderr": float(stderr),
            "interval": [float(low), float(high)]}


def along_directions(evaluate, flat: np.ndarray, directions: dict, step: float, baseline: dict) -> dict:
    """{direction: rise_along(...)} for unit directions {name: [P]} at a step of length `step`; evaluate(members
    [M, P]) -> {task: returns [M, seeds]} on the same agents for every member; baseline: {task: returns [seeds]}
    at flat."""
    names = list(directions)
    offsets = np.stack([step * directions[n] for n in names])
    returns = evaluate(np.concatenate([flat + offsets, flat - offsets]))
    m = len(names)
    return {n: rise_along({t: r[i] for t, r in returns.items()}, {t: r[m + i] for t, r in returns.items()},
                          baseline) for i, n in enumerate(names)}


def implied_cosine(rise: float, random_rises: list[dict], dim: int) -> float | None:
    """A low estimate of the cosine between a direction and the validation objective's gradient: along a random unit
    direction the rise is |grad| step u.g, whose mean square is (|grad| step)^2 / dim; the measured mean square
    adds the measurement's noise, so dividing by it underestimates |grad|'s share in the direction's rise."""
    if len(random_rises) < 2:
        return None
    rms = float(np.sqrt(np.mean([r["rise"] ** 2 for r in random_rises])))
    return float(np.clip(rise / (np.sqrt(dim) * rms + 1e-30), -1.0, 1.0))


def measure_along(args: Args, objective: str, base: tl.Args, shared: dict, log=print) -> dict:
    """Does a step along the truncated meta-gradient raise what validation scores? At the optimizer's fixed
    parameters theta, the validation objective (validation_fitness, both tasks, --along-seeds agents shared by every
    evaluation) is measured at theta +- step d for d: the truncated meta-gradient's descent direction (its mean over
    --measure-steps meta-steps, as in --against-es), meta-Adam's first step from it (-sign g: every coordinate
    moves by the meta-lr), and --random-directions random unit directions, the control that says how large a rise
    chance gives. Steps are --along-steps meta-steps of full size (each meta-lr x sqrt(P) long). Evaluations that
    do not depend on the meta-loss (theta, the random directions) are shared by objectives with the same
    validation settings through `shared`."""
    agent_args, lopt_params = objective_settings(args, objective, base)
    start = time.time()
    warmup = agent_args.reset_interval if args.warmup_steps is None else args.warmup_steps
    truncated = truncated_mean_grad(agent_args, lopt_params, args.tasks, warmup, args.measure_steps, args.seed)
    log(f"  {objective}: truncated meta-gradient over {args.measure_steps} meta-steps, {time.time() - start:.0f}s")
    validation = (repr(tl.lopt_config(agent_args)), agent_args.lopt_lr, agent_args.grad_clip,
                  agent_args.normalize_step, agent_args.eval_envs, agent_args.rollout_steps,
                  np.asarray(ravel_pytree(lopt_params)[0]).tobytes())
    if validation not in shared:
        flat, fitness_fns = validation_fitness(args, agent_args, lopt_params)
        agent_keys = jax.random.split(jax.random.PRNGKey(args.seed + 3000), args.along_seeds)  # apart from --against-es

        dtype = flat.dtype

        def evaluate(members):  # members in chunks of 8, so memory stays that of 8 x --along-seeds agents
            members = jnp.asarray(members, dtype)
            return {name: np.concatenate([np.asarray(fn(agent_keys, members[i:i + 8]), np.float64)
                                          for i in range(0, len(members), 8)]) for name, fn in fitness_fns.items()}

        flat = np.asarray(flat, np.float64)
        baseline = {t: r[0] for t, r in evaluate(flat[None]).items()}
        rng = np.random.default_rng(args.seed)
        randoms = rng.normal(size=(args.random_directions, flat.size))
        randoms = {f"random {i}": u / np.linalg.norm(u) for i, u in enumerate(randoms)}
        unit = agent_args.meta_lr * np.sqrt(flat.size)
        shared[validation] = dict(flat=flat, evaluate=evaluate, baseline=baseline, unit=unit, random={
            n: along_directions(evaluate, flat, randoms, n * unit, baseline) for n in args.along_steps})
        log(f"  {objective}: theta and {args.random_directions} random directions, {time.time() - start:.0f}s")
    s = shared[validation]
    dim = s["flat"].size
    own = {"truncated descent": -truncated / np.linalg.norm(truncated),
           "meta-Adam's first step": -np.sign(truncated) / np.sqrt(dim)}
    by_steps = {}
    for n in args.along_steps:
        rises = along_directions(s["evaluate"], s["flat"], own, n * s["unit"], s["baseline"])
        random_rises = list(s["random"][n].values())
        by_steps[str(n)] = {"step_length": n * s["unit"], **rises, "random": random_rises,
                            "implied_cosine": {d: implied_cosine(r["rise"], random_rises, dim)
                                               for d, r in rises.items()}}
    log(f"  {objective}: along the truncated meta-gradient, {time.time() - start:.0f}s")
    return {"flags": OBJECTIVES[objective], "num_agents": args.num_agents, "measure_steps": args.measure_steps,
            "along_seeds": args.along_seeds, "es_steps": args.es_steps, "parameters": dim,
            "cosine_descent_meta_adam": cosine(own["truncated descent"], own["meta-Adam's first step"]),
            "final_return_at_theta": {t: float(np.mean(r)) for t, r in s["baseline"].items()},
            "by_meta_steps": by_steps, "seconds": time.time() - start}


def main(args: Args, base: tl.Args | None = None) -> None:
    check_args(args, positive=("num_agents", "measure_steps", "splits", "along_seeds"),
               non_negative=("warmup_steps", "random_directions"))
    if args.along and (args.along_seeds < 2 or not args.along_steps or min(args.along_steps) <= 0):
        raise UserError(f"--along needs --along-seeds >= 2 (got {args.along_seeds}) and --along-steps > 0 "
                        f"(got {' '.join(map(str, args.along_steps)) or 'none'})")
    check_choices("--objectives", args.objectives, OBJECTIVES)
    check_choices("--tasks", args.tasks, TASKS)
    for size in args.sizes:
        if size < 2 or size % 2 or size > args.num_agents:
            raise UserError(f"--sizes {size}: each must be even, >= 2 and at most --num-agents {args.num_agents}")
    if args.lopt_path:
        tl.read_optimizer_checkpoint(args.lopt_path)  # a missing or foreign file: its one-line error, now
    results, shared = {}, {}
    for name in args.objectives:
        objective_base = base or dataclasses.replace(tl.Args(), num_envs=SMALL_BATCH)
        if args.along:
            results[name] = r = measure_along(args, name, objective_base, shared)
            for n, at in r["by_meta_steps"].items():
                own = ", ".join(f"{d} {at[d]['rise']:+.4f} ± {at[d]['stderr']:.4f}"
                                for d in ("truncated descent", "meta-Adam's first step"))
                chance = ", ".join(f"{x['rise']:+.4f}" for x in at["random"])
                print(f"{name}, a step of {n} meta-steps: validation rise along {own}; along random directions "
                      f"{chance}", flush=True)
            continue
        if args.against_es:
            results[name] = r = measure_against_es(args, name, objective_base)
            print(f"{name}: cosine truncated descent / ES ascent {r['cosine_truncated_descent_es_ascent']:.3f}; ES "
                  f"split-half {r['es_split_half_cosine']:.3f} at {r['es_pairs']} pairs", flush=True)
            continue
        if args.against_pes:
            results[name] = r = measure_against_pes(args, name, objective_base)
            print(f"{name}: cosine truncated / PES {r['cosine_truncated_pes']:.3f}; even/odd steps: truncated "
                  f"{r['even_odd_cosine']['truncated']:.3f}, PES {r['even_odd_cosine']['pes']:.3f}", flush=True)
            continue
        results[name] = measure(args, name, objective_base)
        cells = ", ".join(f"{n}: {c['mean']:.3f}" for n, c in results[name]["split_half_cosine"].items())
        print(f"{name}: split-half cosine by agents per task {cells}; agents per task for 0.5 / 0.9: "
              + " / ".join("none" if v is None else f"{v:.0f}"
                           for v in results[name]["agents_per_task_for_cosine"].values()), flush=True)
    report = {"command": recorded(["python", *sys.argv]), "tasks": list(args.tasks),
              "lopt_path": recorded(args.lopt_path), "seed": args.seed, "objectives": results}
    atomic_write(args.out, lambda f: f.write((json.dumps(report, indent=1) + "\n").encode()))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_cli(main, tyro.cli(Args, description=__doc__.split("\n\n")[0]))
