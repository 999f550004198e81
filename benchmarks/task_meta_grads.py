"""Which tasks steer meta-training? Per-task meta-gradient norms, and each one's cosine with their sum.

    python benchmarks/task_meta_grads.py --env-group gridworld --meta-tasks all --meta-steps 21 --log-every 4

Runs the meta-training of train_lopt.py (any of its flags) and, every --log-every meta-steps, computes each task's
population meta-gradient on the current population (the same quantity meta_step sums over tasks). A task whose
cosine with the sum flips sign from one row to the next steers meta-training with noise.
"""

import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_lopt as tl  # noqa: E402
from common import ENV_GROUPS, run_cli  # noqa: E402


def main(args: tl.Args) -> None:
    tl.check_settings(args)
    meta = tl.make_meta_train(args, tl.meta_task_names(args, ENV_GROUPS[args.env_group]))
    state = meta.init(jax.random.PRNGKey(args.seed))
    task_grads = [
        jax.jit(lambda params, population, key, step, task=task: meta.population_meta_grad(
            params, task, population, key, step)[1])
        for task in meta.tasks
    ]
    flat = lambda tree: jnp.concatenate([x.ravel() for x in jax.tree.leaves(tree)])  # noqa: E731
    names = [task.name for task in meta.tasks]
    print("meta-step | " + " | ".join(f"{n}: norm, cos" for n in names))
    for step in range(args.meta_steps):
        if step % args.log_every == 0:
            key = jax.random.fold_in(jax.random.PRNGKey(args.seed), step)
            grads = [flat(g(state.lopt_params, pop, key, state.meta_step))
                     for g, pop in zip(task_grads, state.populations)]
            total = sum(grads)
            cells = [f"{float(jnp.linalg.norm(g)):.2e}, "
                     f"{float(g @ total / (jnp.linalg.norm(g) * jnp.linalg.norm(total) + 1e-30)):+.2f}" for g in grads]
            print(f"{step:9d} | " + " | ".join(cells), flush=True)
        state, _ = meta.meta_step(state)


if __name__ == "__main__":
    run_cli(lambda: main(tl.parse_args()))
