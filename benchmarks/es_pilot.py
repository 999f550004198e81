"""Is there a better optimizer near the start? Antithetic evolution strategies on whole agent lifetimes.

    python benchmarks/es_pilot.py --es-steps 30 --out es_pilot.csv

Meta-training's gradient (train_lopt.py: the A2C loss after K updates, through the optimizer) moves Optim4RL away
from a good start (docs/results.md, "What was tried"). This pilot asks whether the return itself has an ascent
direction there: it estimates the gradient of the final return of fresh agents (both small grids, --seeds agents
each, --steps env steps) with respect to the optimizer's parameters by antithetic ES (as OPEN meta-trains), steps
Adam along it, and every --val-every ES steps scores the optimizer with train_lopt.py's validation (16 validation
seeds x 1e5 env steps per task, normalised by tuned Adam): the same score as meta-training's validation column.
Starts from Optim4RL at meta-step 0 with --normalize-step at --lopt-lr 1e-2 (sign-SGD at its tuned step).
"""

import csv
import os
import sys
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro
from jax.flatten_util import ravel_pytree

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_lopt as tl  # noqa: E402
from common import run_cli  # noqa: E402


@dataclass
class Args:
    es_steps: int = 30
    pairs: int = 8
    """antithetic pairs per ES step"""
    sigma: float = 0.03
    """perturbation scale of the optimizer's parameters"""
    es_lr: float = 0.01
    """Adam's learning rate on the ES gradient"""
    seeds: int = 4
    """agents per task and perturbation (the same agents for both members of a pair)"""
    steps: int = 100_000
    """env steps per agent"""
    val_every: int = 5
    lopt_lr: float = 1e-2
    seed: int = 0
    out: str = "es_pilot.csv"


def main(es: Args) -> None:
    args = tl.Args(lopt_lr=es.lopt_lr, normalize_step=True, seed=es.seed, out_dir=os.path.dirname(es.out) or ".")
    task_names = ("small_dense_long", "small_dense_short")
    net = tl.make_lopt_net(tl.lopt_config(args))
    params = tl.init_lopt_params(net, jax.random.PRNGKey(es.seed))
    flat, unravel = ravel_pytree(params)
    validate = tl.Validator(args, task_names)

    def make_tx(flat_params):
        return tl.clipped_learned_optimizer(net, unravel(flat_params), args.lopt_lr, args.grad_clip,
                                            normalize_step=True)

    def task_fitness(name):
        task = tl.Task.make(name, args)
        train = tl.make_a2c_train(task, make_tx, es.steps // (args.rollout_steps * args.eval_envs))

        def final_return(key, flat_params):  # mean return of the episodes ending in the last 10% of updates
            return_sum, return_count = train(key, flat_params)
            tail = max(1, int(round(return_sum.shape[0] * tl.FINAL_FRACTION)))
            return return_sum[-tail:].sum() / jnp.maximum(return_count[-tail:].sum(), 1)

        return jax.jit(jax.vmap(jax.vmap(final_return, (0, None)), (None, 0)))  # [members, seeds]

    fitness = {name: task_fitness(name) for name in task_names}
    meta_opt = optax.adam(es.es_lr)
    opt_state = meta_opt.init(flat)
    key = jax.random.PRNGKey(1000 + es.seed)  # not the validation stream's seeds
    with open(es.out, "w", newline="") as f:
        log = csv.writer(f)
        log.writerow(["es_step", "val_score", "train_fitness", "seconds"])
        start = time.time()
        for step in range(es.es_steps + 1):
            if step % es.val_every == 0 or step == es.es_steps:
                score = validate(unravel(flat))
                print(f"ES step {step}: validation {score:.3f} ({time.time() - start:.0f}s)", flush=True)
                log.writerow([step, score, "", time.time() - start])
                f.flush()
            if step == es.es_steps:
                break
            key, key_noise, key_agents = jax.random.split(key, 3)
            noise = jax.random.normal(key_noise, (es.pairs, flat.size))
            members = jnp.concatenate([flat + es.sigma * noise, flat - es.sigma * noise])
            grad, mean_fitness = jnp.zeros_like(flat), []
            for name in task_names:
                returns = np.asarray(fitness[name](jax.random.split(key_agents, es.seeds), members)).mean(1)
                plus, minus = returns[:es.pairs], returns[es.pairs:]
                # Per task, differences in units of the task's spread: reward scales (1e2, 1e3) do not weight it.
                diff = (plus - minus) / (np.std(returns) + 1e-8)
                grad += jnp.asarray(diff) @ noise / (2 * es.pairs * es.sigma) / len(task_names)
                mean_fitness.append(float(returns.mean()))
            updates, opt_state = meta_opt.update(-grad, opt_state)  # ascend the return
            flat = optax.apply_updates(flat, updates)
            log.writerow([step + 1, "", np.mean(mean_fitness), time.time() - start])
    tl.save_msgpack(os.path.splitext(es.out)[0] + ".msgpack",
                    tl.optimizer_checkpoint(args, unravel(flat), params, es.es_steps))


if __name__ == "__main__":
    run_cli(lambda: main(tyro.cli(Args)))
