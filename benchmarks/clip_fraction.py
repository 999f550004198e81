"""Which parameters have gradients at the element-wise clip? Per layer, during an A2C agent's training.

    python benchmarks/clip_fraction.py --env-group gridworld --lopt-lr 1e-2

For each small grid of the group, 4 agents train with sign-SGD at --lopt-lr (after the clip, the learned
optimizer's meta-step-0 self) and, at updates 0, 50 and 199, the fraction of each layer's gradient coordinates with
|g| >= --grad-clip is printed. The learned optimizer sees those coordinates as log|g| = log(clip), whatever their
true size: with small_dense_long's rewards scaled by 1e3, that is most of the value head.
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_lopt as tl  # noqa: E402
from common import ENV_GROUPS, run_cli  # noqa: E402

AT_UPDATES = (0, 50, 199)


def main(args: tl.Args) -> None:
    tl.check_settings(args)
    for name in tl.meta_task_names(args, ENV_GROUPS[args.env_group]):
        task = tl.Task.make(name, args)
        tx = tl.with_grad_clip(optax.sign_sgd(args.lopt_lr), args.grad_clip)
        step = jax.jit(lambda agent, task=task, tx=tx: tl.a2c_step(task, tx, agent)[0])
        grad = jax.jit(jax.grad(task.loss))
        fractions = {}
        for seed in range(4):
            agent = tl.init_agent(task, tx, jax.random.PRNGKey(seed))
            for update in range(max(AT_UPDATES) + 1):
                if update in AT_UPDATES:
                    traj, _, obs = task.rollout(agent.params, agent.env_state, agent.obs, agent.key)
                    for path, g in jax.tree_util.tree_leaves_with_path(grad(agent.params, traj, obs)):
                        layer = "/".join(str(p.key) for p in path[-2:])
                        fractions.setdefault((layer, update), []).append(float(jnp.mean(jnp.abs(g) >= args.grad_clip)))
                agent = step(agent)
        print(f"{name}: fraction of gradient coordinates at the clip, at updates {AT_UPDATES}")
        for layer in dict.fromkeys(layer for layer, _ in fractions):
            print(f"  {layer:16s}" + " ".join(f"{np.mean(fractions[(layer, u)]):6.2f}" for u in AT_UPDATES))


if __name__ == "__main__":
    run_cli(lambda: main(tl.parse_args()))
