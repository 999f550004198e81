"""What step size did a learned optimizer learn? Its mean |update| / learning rate on synthetic gradient streams.

    python benchmarks/step_size.py checkpoints/optim4rl_gridworld.msgpack runs/<run>/optimizer.msgpack

For each checkpoint and gradient magnitude, 1,000 coordinates receive 20 steps of gradients of that magnitude
(random signs, or one constant sign), and the mean |direction| of the last 5 steps is printed: the update in
units of the learning rate. Optim4RL at meta-step 0 is sign-SGD, which prints 1.0 everywhere.
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_lopt as tl  # noqa: E402
from common import run_cli  # noqa: E402


def step_sizes(path: str, magnitudes=(1e-6, 1e-4, 1e-2, 1.0), steps: int = 20, coordinates: int = 1000) -> dict:
    ckpt = tl.read_optimizer_checkpoint(path)
    net = tl.make_lopt_net(ckpt["config"])
    apply = jax.jit(net.apply)
    signs = jnp.sign(jax.random.normal(jax.random.PRNGKey(0), (steps, coordinates)))
    out = {}
    for magnitude in magnitudes:
        for stream, grads in (("random signs", magnitude * signs), ("constant sign", jnp.full_like(signs, magnitude))):
            carry, directions = tl.initial_carry(net, coordinates), []
            for g in grads:
                carry, direction = apply(ckpt["params"], carry, g)
                directions.append(direction)
            out[(magnitude, stream)] = float(np.abs(np.stack(directions[-5:])).mean())
    return out


def main(paths: list[str]) -> None:
    if not paths:
        raise tl.UserError("give one or more optimizer checkpoints (optimizer.msgpack)")
    for path in paths:
        sizes = step_sizes(path)
        print(path)
        for magnitude in sorted({m for m, _ in sizes}):
            print(f"  |g| = {magnitude:g}: |update| / lr = {sizes[(magnitude, 'random signs')]:.3g} (random signs), "
                  f"{sizes[(magnitude, 'constant sign')]:.3g} (constant sign)")


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
