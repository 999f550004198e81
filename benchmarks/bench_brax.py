"""Side by side in one process: Brax's own PPO trainer against eval_brax.py's PPO with Adam, at the same
settings on the same environment, then eval_brax.py's PPO with the learned optimizer.

    python benchmarks/bench_brax.py --env inverted_pendulum --seeds 3 --lopt-path runs/<run>/optimizer.msgpack

Per seed it alternates: Brax's trainer, then ours with Adam (compiled once, reused for every seed), then
ours with the learned optimizer. It reports
- training env steps per second after compilation, per trainer, evaluations excluded: Brax's own
  'training/sps' of every epoch but the first (the first includes compilation), and ours per evaluation
  period but the first, timed from the end of one evaluation to the end of the period's updates;
- the same with evaluations included, for both: env steps over the time between consecutive evaluations;
- final deterministic evaluation returns of both trainers, mean and std over seeds (correctness);
- the wall time of PPO with the learned optimizer over PPO with Adam, after compilation and in total.

Brax 0.14.2's trainer does not run under jax 0.10.2 as released; two fixes, applied here and nowhere else:
`jax.device_put_replicated` no longer exists, and its evaluator recompiles at every evaluation unless the
parameters it gets are plain host arrays.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import tyro
from brax import envs
from brax.training import acting
from brax.training.agents.ppo import train as brax_ppo

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import eval_brax as eb  # noqa: E402
from common import run_cli  # noqa: E402


@dataclass
class BenchArgs:
    env: str = "inverted_pendulum"
    backend: str = "positional"
    total_timesteps: int = 300_000
    """per seed; rounded up to whole evaluation periods so that both trainers take the same steps"""
    num_evals: int = 5
    seeds: int = 3
    num_eval_envs: int = 16
    lopt_path: str | None = None
    """also time eval_brax.py with this learned optimizer"""
    out: str | None = None
    """write the measurements to this JSON file"""


def _device_put_replicated(tree, devices):
    """The removed jax.device_put_replicated: a leading axis of len(devices), one slice per device."""
    sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(devices), ("devices",)),
                                          jax.sharding.PartitionSpec("devices"))
    return jax.device_put(jax.tree.map(lambda x: jnp.stack([x] * len(devices)), tree), sharding)


def patch_brax_trainer() -> None:
    jax.device_put_replicated = _device_put_replicated
    run_evaluation = acting.Evaluator.run_evaluation

    def run_evaluation_on_host_params(self, policy_params, *args, **kwargs):
        # Parameters that come out of the pmapped training carry a sharding the evaluator's jit was not
        # compiled for; copying them through host memory avoids a recompilation at every evaluation.
        return run_evaluation(self, jax.device_get(policy_params), *args, **kwargs)

    acting.Evaluator.run_evaluation = run_evaluation_on_host_params


def run_brax(ppo_args: eb.Args, env, seed: int) -> dict:
    epochs = []  # (env steps, metrics, time) after every evaluation

    def record(step, metrics):
        epochs.append((int(step), {k: float(v) for k, v in metrics.items()}, time.time()))

    start = time.time()
    brax_ppo.train(
        environment=env, num_timesteps=ppo_args.total_timesteps, episode_length=ppo_args.episode_length,
        action_repeat=ppo_args.action_repeat, num_envs=ppo_args.num_envs, learning_rate=ppo_args.learning_rates[0],
        entropy_cost=ppo_args.entropy_cost, discounting=ppo_args.discounting, unroll_length=ppo_args.unroll_length,
        batch_size=ppo_args.batch_size, num_minibatches=ppo_args.num_minibatches,
        num_updates_per_batch=ppo_args.num_updates_per_batch, normalize_observations=ppo_args.normalize_observations,
        reward_scaling=ppo_args.reward_scaling, clipping_epsilon=ppo_args.clipping_epsilon,
        gae_lambda=ppo_args.gae_lambda, vf_loss_coefficient=ppo_args.value_coef,
        num_evals=ppo_args.num_evals + 1, num_eval_envs=ppo_args.num_eval_envs, deterministic_eval=True,
        seed=seed, progress_fn=record,
    )
    steady_sps = [m["training/sps"] for _, m, _ in epochs[2:]]  # epochs[0]: initial eval; epochs[1]: with compile
    steps, times = np.array([e[0] for e in epochs]), np.array([e[2] for e in epochs])
    with_eval_sps = (np.diff(steps) / np.diff(times))[1:]
    return {"final_return": epochs[-1][1]["eval/episode_reward"], "env_steps": epochs[-1][0],
            "sps": float(np.median(steady_sps)), "epoch_sps": steady_sps,
            "sps_with_eval": float(np.median(with_eval_sps)), "wall_s": time.time() - start,
            "curve": [(s, m["eval/episode_reward"]) for s, m, _ in epochs]}


class OurTrainer:
    """eval_brax.make_train for one optimizer, compiled once; each call runs one seed."""

    def __init__(self, ppo_args: eb.Args, env, optimizer_name: str):
        self.trained, self.evaluated = [], []  # times at which each period's updates and evaluation ended
        lr = ppo_args.lopt_lr if optimizer_name == "lopt" else ppo_args.learning_rates[0]
        train = eb.make_train(ppo_args, env, eb.make_optimizer(ppo_args, optimizer_name, lr),
                              on_eval=lambda *_: self.evaluated.append(time.time()),
                              on_trained=lambda _: self.trained.append(time.time()))
        start = time.time()
        self.compiled = jax.jit(train).lower(jax.random.split(jax.random.PRNGKey(0), 1)).compile()
        self.compile_s = time.time() - start
        self.updates, self.env_steps = eb.eval_schedule(ppo_args)

    def __call__(self, seed: int) -> dict:
        self.trained, self.evaluated = [], []
        start = time.time()
        _, returns = self.compiled(jax.random.split(jax.random.PRNGKey(seed), 1))
        returns = np.asarray(returns)[:, 0]
        trained, evaluated = np.array(self.trained), np.array(self.evaluated)
        # Periods 2..K: period 1 follows the first evaluation, which can still carry one-off start-up work.
        period_steps = np.diff(self.env_steps)[1:]
        period_sps = period_steps / (trained[2:] - evaluated[1:-1])
        with_eval_sps = period_steps / np.diff(evaluated)[1:]
        return {"final_return": float(returns[-1]), "env_steps": int(self.env_steps[-1]),
                "sps": float(np.median(period_sps)), "epoch_sps": period_sps.tolist(),
                "sps_with_eval": float(np.median(with_eval_sps)), "wall_s": time.time() - start,
                "after_first_eval_s": float(evaluated[-1] - evaluated[0]),
                "curve": list(zip(self.env_steps.tolist(), returns.tolist()))}


def main(bench: BenchArgs) -> None:
    patch_brax_trainer()
    # Brax's trainer compiles again at every call; with this cache, seeds after the first load its program.
    jax.config.update("jax_compilation_cache_dir", os.path.join(tempfile.gettempdir(), "jax_cache_bench_brax"))
    ppo_args = eb.parse_args(["--env", bench.env, "--backend", bench.backend, "--num-seeds", "1",
                              "--num-evals", str(bench.num_evals), "--num-eval-envs", str(bench.num_eval_envs)])
    eb.check_settings(ppo_args)
    per_period = eb.env_steps_per_update(ppo_args)
    per_period *= -(-bench.total_timesteps // (per_period * bench.num_evals))  # whole updates per period
    ppo_args.total_timesteps = per_period * bench.num_evals
    env = envs.get_environment(bench.env, backend=bench.backend)
    print(f"{bench.env} ({bench.backend}): {ppo_args.total_timesteps:,} env steps per seed, settings: "
          + ", ".join(f"{k}={getattr(ppo_args, k)}" for k in ("num_envs", "batch_size", "num_minibatches",
                                                              "unroll_length", "num_updates_per_batch",
                                                              "reward_scaling", "discounting", "entropy_cost")),
          flush=True)

    ours = {"adam": OurTrainer(ppo_args, env, "adam")}
    if bench.lopt_path:
        ppo_args.lopt_path = bench.lopt_path
        ours["lopt"] = OurTrainer(ppo_args, env, "lopt")
    print("compile s: " + ", ".join(f"{name} {t.compile_s:.0f}" for name, t in ours.items()), flush=True)
    results = {"brax": [], **{name: [] for name in ours}}
    for seed in range(bench.seeds):
        results["brax"].append(run_brax(ppo_args, env, seed))
        for name, trainer in ours.items():
            results[name].append(trainer(seed))
        print(f"seed {seed}: " + " | ".join(f"{name} return {r[-1]['final_return']:.1f}, {r[-1]['sps']:,.0f} steps/s, "
                                           f"{r[-1]['wall_s']:.0f}s" for name, r in results.items()), flush=True)

    def stats(name, key):
        values = np.array([r[key] for r in results[name]])
        return float(values.mean()), float(values.std())

    report = {name: {"final_return_mean_std": stats(name, "final_return"),
                     "sps_median": float(np.median([r["sps"] for r in results[name]])),
                     "sps_with_eval_median": float(np.median([r["sps_with_eval"] for r in results[name]]))}
              for name in results}
    report["ratio_sps_ours_adam_over_brax"] = report["adam"]["sps_median"] / report["brax"]["sps_median"]
    report["ratio_sps_with_eval_ours_adam_over_brax"] = (report["adam"]["sps_with_eval_median"]
                                                         / report["brax"]["sps_with_eval_median"])
    if "lopt" in ours:
        after_compile = {n: np.median([r["after_first_eval_s"] for r in results[n]]) for n in ("adam", "lopt")}
        report["ratio_wall_lopt_over_adam_after_compile"] = float(after_compile["lopt"] / after_compile["adam"])
        report["ratio_wall_lopt_over_adam_with_compile"] = float(
            (ours["lopt"].compile_s + np.median([r["wall_s"] for r in results["lopt"]]))
            / (ours["adam"].compile_s + np.median([r["wall_s"] for r in results["adam"]])))
    report.update(env=bench.env, backend=bench.backend, env_steps_per_seed=ppo_args.total_timesteps,
                  seeds=bench.seeds, compile_s={n: t.compile_s for n, t in ours.items()}, runs=results)

    print(f"\n{'trainer':<14}{'final return (mean +- std)':>28}{'env steps/s':>14}{'with evals':>12}")
    for name in results:
        mean, std = report[name]["final_return_mean_std"]
        label = "brax ppo.train" if name == "brax" else f"ours, {name}"
        print(f"{label:<14}{f'{mean:.1f} +- {std:.1f}':>28}{report[name]['sps_median']:>14,.0f}"
              f"{report[name]['sps_with_eval_median']:>12,.0f}")
    print(f"env steps/s, ours (adam) / Brax's trainer: {report['ratio_sps_ours_adam_over_brax']:.2f}x without "
          f"evaluations, {report['ratio_sps_with_eval_ours_adam_over_brax']:.2f}x with them")
    if "lopt" in ours:
        print(f"wall time, lopt / adam: {report['ratio_wall_lopt_over_adam_after_compile']:.2f}x after compilation, "
              f"{report['ratio_wall_lopt_over_adam_with_compile']:.2f}x with it")
    if bench.out:
        with open(bench.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    run_cli(lambda: main(tyro.cli(BenchArgs)))
