"""Headroom: what can a step schedule alone give a baseline, at both horizons the project reports?

    python benchmarks/schedule_headroom.py        # writes results/gridworld_schedule_headroom.json

A learned optimizer that is to beat baselines tuned per horizon must change its step over the lifetime, since
the tuned constant lr of every baseline falls about 3x from 1e5 to 1e6 env steps (docs/results.md). This asks how
much that alone is worth. Adam and sign-SGD get the horizon-free decay lr / sqrt(1 + t / tau), t the update count
(a drop-in optimizer can implement it: it needs no run length), and one (lr, tau) per task and optimizer is picked
on the validation seeds for both horizons together: the one with the best mean, over the horizons, of its
validation mean normalised as the tables are (0 = random policy, 1 = the grid's best at that horizon). The constant lr picked the same way (tau = inf, one lr
for both horizons) is the schedule's control. Both are then run on the evaluation seeds, at both horizons, with
the same agents, batch (--eval-envs 32) and element-wise clip as `train_lopt.py`'s tuned evaluation, so
results/table.py normalises them with that evaluation's tuned Adam and random policy (results/gridworld_shipped_*).

A schedule that does not know the run's length gives a shorter horizon's run as the first updates of a longer one,
so each (task, optimizer, seed stream) is one compiled program over all its configurations x seeds, trained to the
longest horizon and scored at each; it is kept under --cache-dir as it finishes: a killed run resumes there.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_lopt as tl  # noqa: E402
from common import GRIDWORLDS, UserError, atomic_write, check_args, check_choices, recorded, run_cli  # noqa: E402

OPTIMIZERS = ("adam", "sign_sgd")
TASKS = (*GRIDWORLDS, "catch")
CONSTANT = math.inf  # tau of a constant lr


@dataclass
class Args:
    tasks: tuple[str, ...] = ("small_dense_long", "small_dense_short")
    optimizers: tuple[str, ...] = OPTIMIZERS
    lrs: tuple[float, ...] = (3e-3, 1e-2, 3e-2)
    """initial learning rates of the grid"""
    taus: tuple[float, ...] = (32.0, 256.0)
    """decay times of the grid, in updates (the constant lr, tau = inf, is always in it)"""
    horizons: tuple[int, ...] = (100_000, 1_000_000)
    """env steps per agent"""
    val_seeds: int = 16
    eval_seeds: int = 16
    eval_envs: int = 32
    out: str = "results/gridworld_schedule_headroom.json"
    cache_dir: str = "runs/schedule_headroom"


def decayed(lr, tau):
    """lr / sqrt(1 + t / tau) as an optax schedule of the update count t (tau = inf: the constant lr)."""
    return lambda count: lr / jnp.sqrt(1.0 + count / tau)


def make_sweep(task: tl.Task, name: str, num_updates: int, grad_clip: float):
    """sweep(keys [S], configs [C, 2] of (lr, tau)) -> per-update (return_sum, return_count) [C, S, updates].
    name "random": the random policy (its configs are ignored)."""

    def make_tx(config):
        optimizer = "adam" if name == "random" else name
        return tl.with_grad_clip(tl.baseline_optimizer(optimizer, decayed(config[0], config[1])), grad_clip)

    train = tl.make_a2c_train(task, make_tx, num_updates, random_policy=name == "random")
    return jax.jit(jax.vmap(jax.vmap(train, (0, None)), (None, 0)))


def grid(args: Args) -> list[tuple[float, float]]:
    return [(lr, tau) for lr in args.lrs for tau in (CONSTANT, *args.taus)]


def pick(val_means: dict[int, np.ndarray], random_means: dict[int, float], configs: list[tuple[float, float]],
         constant_only: bool) -> int:
    """Index of the configuration with the best mean over horizons of its normalised validation mean (0 = the
    random policy, 1 = the best allowed configuration at that horizon), as the tables normalise."""
    allowed = [i for i, (_, tau) in enumerate(configs) if tau == CONSTANT or not constant_only]
    relative = np.mean([(means - random_means[h]) / (np.max(means[allowed]) - random_means[h])
                        for h, means in val_means.items()], axis=0)
    return max(allowed, key=lambda i: relative[i])


class Runs:
    """Final returns per (task, optimizer, stream, configs) at every horizon, computed once, kept under cache_dir.

    The schedules know nothing of the run's length, so a shorter horizon's run is the first updates of the longest
    one: each configuration is trained once, to the longest horizon, and scored at every horizon from its prefix.
    """

    def __init__(self, args: Args, agent_args: tl.Args | None = None):
        self.args = args  # agent_args: train_lopt's agent settings (its defaults unless given)
        self.train_args = dataclasses.replace(agent_args or tl.Args(), num_envs=args.eval_envs, eval_envs=args.eval_envs)
        self.updates = {h: h // (self.train_args.rollout_steps * args.eval_envs) for h in args.horizons}

    def returns(self, task_name: str, name: str, stream: int, configs) -> dict[int, np.ndarray]:
        """{horizon: final returns [len(configs), seeds]} on the stream's seeds."""
        seeds = self.args.val_seeds if stream == tl.VAL_STREAM else self.args.eval_seeds
        label = "_".join(f"{lr:g}-{tau:g}" for lr, tau in configs)
        horizons = "-".join(str(h) for h in self.args.horizons)
        path = os.path.join(self.args.cache_dir, f"{task_name}_{name}_{horizons}_{stream}_{seeds}_{label}.json")
        if os.path.exists(path):
            with open(path) as f:
                return {int(h): np.asarray(r, float) for h, r in json.load(f).items()}
        task = tl.Task.make(task_name, self.train_args)
        sweep = make_sweep(task, name, max(self.updates.values()), self.train_args.grad_clip)
        keys = tl.evaluation_keys(task_name, stream, seeds, tl.STREAM_FLAGS[stream])
        start = time.time()
        return_sum, return_count = sweep(keys, jnp.asarray(configs, jnp.float32))
        returns = {h: tl.final_returns(return_sum[..., :u], return_count[..., :u]) for h, u in self.updates.items()}
        print(f"  {task_name} {name}, {len(configs)} configs x {seeds} seeds, {max(self.updates.values())} updates: "
              f"{time.time() - start:.0f}s", flush=True)
        atomic_write(path, lambda f: f.write(json.dumps({h: r.tolist() for h, r in returns.items()}).encode()))
        return returns


def tau_json(tau: float):
    return None if tau == CONSTANT else tau


def run_task(args: Args, runs: Runs, task_name: str, name: str) -> dict:
    configs = grid(args)
    val_returns = runs.returns(task_name, name, tl.VAL_STREAM, configs)
    val_means = {h: np.array([tl.selection_score(r) for r in val_returns[h]]) for h in args.horizons}
    random_returns = runs.returns(task_name, "random", tl.VAL_STREAM, [(1.0, CONSTANT)])
    random_means = {h: float(np.mean(r)) for h, r in random_returns.items()}
    picked = {kind: configs[pick(val_means, random_means, configs, constant_only=kind == "constant")]
              for kind in ("schedule", "constant")}
    eval_returns = runs.returns(task_name, name, tl.EVAL_STREAM, list(picked.values()))
    returns = {h: {kind: eval_returns[h][i].tolist() for i, kind in enumerate(picked)} for h in args.horizons}
    return {
        "picked": {kind: {"lr": lr, "tau": tau_json(tau)} for kind, (lr, tau) in picked.items()},
        "val_random_mean": {str(h): m for h, m in random_means.items()},
        "val_mean": {str(h): [{"lr": lr, "tau": tau_json(tau), "mean": float(m)}
                              for (lr, tau), m in zip(configs, val_means[h])] for h in args.horizons},
        "returns": {str(h): r for h, r in returns.items()},
    }


def main(args: Args, agent_args: tl.Args | None = None) -> None:
    check_args(args, positive=("val_seeds", "eval_seeds", "eval_envs"))
    check_choices("--optimizers", args.optimizers, OPTIMIZERS)
    check_choices("--tasks", args.tasks, TASKS)
    if min(args.lrs) <= 0 or min(args.taus, default=1.0) <= 0:
        raise UserError("--lrs and --taus must be positive")
    update_steps = (agent_args or tl.Args()).rollout_steps * args.eval_envs
    if min(args.horizons) < update_steps:
        raise UserError(f"--horizons: each must allow one update ({update_steps} env steps)")
    start = time.time()
    runs = Runs(args, agent_args)
    tasks = {t: {name: run_task(args, runs, t, name) for name in args.optimizers} for t in args.tasks}
    result = {
        "command": recorded(["python", *sys.argv]),
        "schedule": "lr / sqrt(1 + t / tau), t = update count; tau null = constant lr",
        "horizons": list(args.horizons), "val_seeds": args.val_seeds, "eval_seeds": args.eval_seeds,
        "eval_envs": args.eval_envs, "tasks": tasks,
    }
    atomic_write(args.out, lambda f: f.write((json.dumps(result, indent=1) + "\n").encode()))
    for t, by_name in tasks.items():
        for name, r in by_name.items():
            print(f"{t} {name}: picked {r['picked']}; eval means "
                  + " ".join(f"{h}: " + ", ".join(f"{k} {np.mean(v):.2f}" for k, v in r["returns"][h].items())
                             for h in r["returns"]))
    print(f"wrote {args.out} in {time.time() - start:.0f}s")


if __name__ == "__main__":
    run_cli(main, tyro.cli(Args, description=__doc__.split("\n\n")[0]))
