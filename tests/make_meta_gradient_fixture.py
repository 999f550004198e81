"""Writes tests/data/meta_gradient_tiny.msgpack: the tiny run's meta-gradient, as test_population_meta_gradient
computes it (the `meta` fixture's state after 3 meta-steps, key 7), so that speed-only changes to the
meta-step can be checked against the code before them.

Regenerate only when the maths changes on purpose (new agent, loss or optimizer), never to make a speed change
pass: python tests/make_meta_gradient_fixture.py
"""

import os
import sys

import jax

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.path.dirname(os.path.abspath(__file__))]
import train_lopt as tl  # noqa: E402
from common import save_msgpack  # noqa: E402
from test_train_lopt import TASKS, tiny_args  # noqa: E402

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "meta_gradient_tiny.msgpack")


def tiny_meta_gradient():
    mt = tl.make_meta_train(tiny_args(), TASKS)
    state = mt.init(jax.random.PRNGKey(0))
    for _ in range(3):
        state, _ = mt.meta_step(state)
    inputs = (state.lopt_params, state.populations[0], jax.random.PRNGKey(7), state.meta_step)
    (loss, _), grads = jax.jit(lambda *a: mt.population_meta_grad(a[0], mt.tasks[0], *a[1:]))(*inputs)
    return dict(loss=loss, grads=grads)


if __name__ == "__main__":
    save_msgpack(sys.argv[1] if len(sys.argv) > 1 else FIXTURE, tiny_meta_gradient())
