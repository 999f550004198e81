"""Cost of one learned-optimizer step against one Adam step, on the parameters of a Brax PPO agent.

    python benchmarks/bench_lopt.py                      # hopper's PPO networks: 270k coordinates
    python benchmarks/bench_lopt.py --env ant --repeats 50

Times, in alternation in one process (medians of --repeats calls, after compilation):
- adam: one optax.adam update;
- lopt (flax layers): one Optim4RL update, the network built from flax's nn.GRUCell and nn.Dense;
- lopt (coordinate layers): the same network as train_lopt.py builds it (CoordinateGRUCell, coordinate_dot_general);
- the meta-gradient of both variants: forward, rematerialised forward and backward through one update, as in
  meta-training.
The optimizer is the shipped checkpoint (or --lopt-path); both variants load the same parameters and their
updates are checked to agree. Ratios hold on a noisy machine; absolute times do not.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro
from brax import envs
from brax.training.agents.ppo import networks as brax_ppo_networks
from jax.flatten_util import ravel_pytree

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_lopt as tl  # noqa: E402
from common import PRETRAINED_OPTIMIZER, run_cli  # noqa: E402


@dataclass
class BenchArgs:
    env: str = "hopper"
    """Brax environment whose PPO networks (Brax's default sizes) give the parameters"""
    lopt_path: str = PRETRAINED_OPTIMIZER
    repeats: int = 30


def median_ms(fn, *args, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def main(args: BenchArgs) -> None:
    env = envs.get_environment(args.env)
    networks = brax_ppo_networks.make_ppo_networks(env.observation_size, env.action_size)
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    params = (networks.policy_network.init(keys[0]), networks.value_network.init(keys[1]))
    flat, unravel = ravel_pytree(params)
    num_coordinates = flat.size
    grads = unravel(1e-2 * jax.random.normal(keys[2], flat.shape))
    ckpt = tl.read_optimizer_checkpoint(args.lopt_path)
    net = tl.make_lopt_net(ckpt["config"])

    def compiled(lopt_params):
        tx = tl.learned_optimizer(net, lopt_params, 1e-3)
        state = tx.init(params)
        step = jax.jit(lambda state, grads: tx.update(grads, state))
        state = step(state, grads)[1]  # a non-zero recurrent state, as after the first step
        return step, state

    def meta_gradient(lopt_params, state):
        def loss(p):
            updates, new_state = tl.learned_optimizer(net, p, 1e-3, rematerialize=True).update(grads, state)
            return sum(jnp.sum(u**2) for u in jax.tree.leaves(updates)) + sum(
                jnp.sum(c**2) for c in new_state.carry)
        return jax.grad(loss)(lopt_params)

    rows = {}
    adam = optax.adam(3e-4)
    rows["adam"] = (jax.jit(lambda state, grads: adam.update(grads, state)), adam.init(params), grads)
    for name, layers in [("flax layers", (nn.GRUCell, jax.lax.dot_general)),
                         ("coordinate layers", (tl.CoordinateGRUCell, tl.coordinate_dot_general))]:
        # Swap the GRU class and the Dense layers' dot_general that Optim4RL is built with while its functions are traced and compiled.
        with mock.patch.object(tl, "CoordinateGRUCell", layers[0]), \
                mock.patch.object(tl, "coordinate_dot_general", layers[1]):
            step, state = compiled(ckpt["params"])
            rows[f"lopt ({name})"] = (step, state, grads)
            grad_fn = jax.jit(meta_gradient)
            jax.block_until_ready(grad_fn(ckpt["params"], state))
            rows[f"meta-gradient ({name})"] = (grad_fn, ckpt["params"], state)
    updates = [rows[f"lopt ({name})"][0](*rows[f"lopt ({name})"][1:])[0]
               for name in ("flax layers", "coordinate layers")]
    gap = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(*map(jax.tree.leaves, updates)))
    scale = max(float(jnp.max(jnp.abs(a))) for a in jax.tree.leaves(updates[0]))

    times = {name: [] for name in rows}
    for _ in range(2):  # alternate, so that a slow spell of the machine hits every row
        for name, (fn, *fn_args) in rows.items():
            fn(*fn_args)  # warm
            times[name].append(median_ms(fn, *fn_args, repeats=args.repeats))
    ms = {name: float(np.median(t)) for name, t in times.items()}
    print(f"{args.env}: {num_coordinates:,} coordinates; the two lopt variants' updates differ by at most "
          f"{gap:.1e} (largest update {scale:.1e})")
    for name, value in ms.items():
        print(f"  {name:<32} {value:8.2f} ms")
    print(f"lopt / adam: {ms['lopt (flax layers)'] / ms['adam']:.1f}x with flax layers, "
          f"{ms['lopt (coordinate layers)'] / ms['adam']:.1f}x with coordinate layers")
    print(f"coordinate layers speed-up: {ms['lopt (flax layers)'] / ms['lopt (coordinate layers)']:.2f}x per step, "
          f"{ms['meta-gradient (flax layers)'] / ms['meta-gradient (coordinate layers)']:.2f}x per meta-gradient")


if __name__ == "__main__":
    run_cli(lambda: main(tyro.cli(BenchArgs, description=__doc__.split("\n")[0])))
