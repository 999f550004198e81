"""The learned optimizer as a plain optax transformation (load_optimizer, no meta-gradient) and OPEN
(open_optimizer.py) against Adam, in the two training loops users drop them into, side by side in one process:

    python benchmarks/bench_optax_loops.py                       # A2C on three grids and catch, PPO on hopper
    python benchmarks/bench_optax_loops.py --a2c-tasks catch --ppo-env none

- A2C (train_lopt.make_a2c_train, the evaluation's loop): --seeds agents vmapped, --a2c-updates updates each;
- PPO (eval_brax.make_train, the Brax protocol's loop) on --ppo-env at its preset, --ppo-steps env steps per seed.
Each loop is compiled once per optimizer, then they are timed in alternation (--repeats each), so a slow spell
of the machine hits all of them. Reported: median wall per run, compilation excluded, and each / Adam.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import jax
import numpy as np
import optax
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_lopt as tl  # noqa: E402
from common import PRETRAINED_OPTIMIZER, run_cli  # noqa: E402
from open_optimizer import open_optimizer  # noqa: E402

OPTIMIZERS = ("adam", "lopt", "open")


@dataclass
class BenchArgs:
    a2c_tasks: tuple[str, ...] = ("small_dense_long", "big_dense_long", "catch")
    """A2C tasks (empty for none)"""
    seeds: int = 16
    """A2C agents per run, vmapped (the evaluation's --eval-seeds)"""
    a2c_updates: int = 30
    ppo_env: str = "hopper"
    """Brax task for PPO, or 'none'"""
    ppo_steps: int = 51_200
    """PPO env steps per seed (5 batches of hopper's preset)"""
    lopt_path: str = PRETRAINED_OPTIMIZER
    repeats: int = 3


def alternate(runs: dict, repeats: int) -> dict[str, float]:
    """Median seconds per call of each compiled run, calls interleaved."""
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, (fn, inputs) in runs.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*inputs))
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def a2c_runs(bench: BenchArgs, task_name: str) -> dict:
    args = tl.Args()
    task = tl.Task.make(task_name, args)
    keys = jax.random.split(jax.random.PRNGKey(0), bench.seeds)
    optimizers = {"adam": tl.with_grad_clip(optax.adam(3e-3), args.grad_clip),
                  "lopt": tl.load_optimizer(bench.lopt_path),
                  "open": open_optimizer(bench.a2c_updates, 3e-3, layer_proportions=tl.ActorCritic.layer_proportions,
                                         noise_mask=tl.ActorCritic.noise_mask)}
    runs = {}
    for name, tx in optimizers.items():
        train = tl.make_a2c_train(task, lambda _, tx=tx: tx, bench.a2c_updates)
        runs[name] = (jax.jit(jax.vmap(train, (0, None))).lower(keys, None).compile(), (keys, None))
    return runs


def ppo_runs(bench: BenchArgs) -> dict:
    import eval_brax as eb  # noqa: PLC0415 (brax only when PPO is benchmarked)
    from brax import envs  # noqa: PLC0415

    args = eb.parse_args(["--env", bench.ppo_env, "--total-timesteps", str(bench.ppo_steps), "--num-evals", "1",
                          "--num-seeds", "1", "--lopt-path", bench.lopt_path])
    env = envs.get_environment(args.env, backend=args.backend)
    keys = jax.random.split(jax.random.PRNGKey(args.seed), args.num_seeds)
    runs = {}
    for name, lr in (("adam", 3e-4), ("lopt", args.lopt_lr), ("open", 1e-3)):
        train = eb.make_train(args, env, eb.make_optimizer(args, name, lr))
        runs[name] = (jax.jit(train).lower(keys).compile(), (keys,))
    return runs


def main(bench: BenchArgs) -> None:
    print(f"bench_optax_loops: {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs, optimizer {bench.lopt_path}")
    rows = []
    loops = [(f"A2C {t} ({bench.seeds} agents x {bench.a2c_updates} updates)", lambda t=t: a2c_runs(bench, t))
             for t in bench.a2c_tasks]
    if bench.ppo_env != "none":
        loops.append((f"PPO {bench.ppo_env} ({bench.ppo_steps:,} env steps)", lambda: ppo_runs(bench)))
    for label, build in loops:
        times = alternate(build(), bench.repeats)
        rows.append((label, times))
        print(f"{label}: " + ", ".join(f"{n} {times[n]:.2f} s" for n in OPTIMIZERS) + ", "
              + ", ".join(f"{n} / adam {times[n] / times['adam']:.2f}" for n in OPTIMIZERS[1:]), flush=True)
    print("\n| loop | Adam s | lopt s | OPEN s | lopt / Adam | OPEN / Adam |\n|---|---:|---:|---:|---:|---:|")
    for label, times in rows:
        print(f"| {label} | " + " | ".join(f"{times[n]:.2f}" for n in OPTIMIZERS) + " | "
              + " | ".join(f"{times[n] / times['adam']:.2f}" for n in OPTIMIZERS[1:]) + " |")


if __name__ == "__main__":
    run_cli(lambda: main(tyro.cli(BenchArgs, description=__doc__.split("\n")[0])))
