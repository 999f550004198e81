"""Tests for train_lopt.py: gradient processing, the learned optimizers and their optax wrapper, the reset
schedule, TD(lambda) targets, meta-gradients (against finite differences), meta-training, checkpoints,
resuming, evaluation and the command line.

Compilation dominates the run time, so every meta-training configuration is tiny and shared (TINY):
runs with identical settings compile to the same program, which the persistent compilation cache set up
in conftest.py then serves from disk instead of compiling it again.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import errno
import re
import shutil
import signal
import subprocess
import sys
import time
import typing
from functools import partial
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import script_cases
import train_lopt as tl
from common import ENV_GROUPS, UserError, flag_name, load_msgpack, save_arrays, save_msgpack
from train_lopt import (
    EVAL_NAMES,
    L2L,
    Args,
    LinearOptim,
    Optim4RL,
    init_lopt_params,
    initial_carry,
    lambda_returns,
    learned_optimizer,
    load_optimizer,
    lopt_config,
    make_lopt_net,
    meta_train,
    process_gradient,
    read_optimizer_checkpoint,
    reset_mask,
    reset_offsets,
    with_grad_clip,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = ("catch",)  # catch: cheapest to compile, and its 9-step episodes end inside tiny evaluations
TINY = dict(env_group="catch", num_agents=2, num_envs=1, rollout_steps=4, inner_updates=2, hidden_size=8,
            meta_steps=2, save_every=1, log_every=1, eval_seeds=2, eval_steps=64, eval_envs=1, seed=0, val_every=0,
            val_seeds=2, val_steps=64, eval_open=False)  # OPEN's programs: compiled by test_main_end_to_end alone
SIGN_SGD = 1.0 / math.sqrt(1.0 + 1e-8)  # Optim4RL at initialisation: sign(g) / sqrt(exp(0) + 1e-8)


def cli_flags(settings: dict) -> list[str]:
    """train_lopt.py's command line for these settings (a boolean is --name or --no-name)."""
    flags = []
    for k, v in settings.items():
        if isinstance(v, bool):
            flags.append(flag_name(k) if v else flag_name(k).replace("--", "--no-", 1))
        else:
            flags += [flag_name(k), str(v)]
    return flags


def tiny_args(**overrides) -> Args:
    return dataclasses.replace(Args(), **{**TINY, **overrides})


def leaves_equal(a, b, atol=0.0):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(la, lb):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=atol)


def tree_finite(tree) -> bool:
    return all(bool(np.all(np.isfinite(np.asarray(x)))) for x in jax.tree.leaves(tree))


def read_rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------------------------
# Shared, compiled-once objects
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def meta():
    """make_meta_train on the tiny config, after 3 meta-steps (meta_step donates: always rebind)."""
    mt = tl.make_meta_train(tiny_args(), TASKS)
    state = mt.init(jax.random.PRNGKey(0))
    init_params = jax.device_get(state.lopt_params)
    metrics = []
    for _ in range(3):
        state, m = mt.meta_step(state)
        metrics.append(jax.device_get(m))
    return SimpleNamespace(mt=mt, state=state, init_params=init_params, metrics=metrics)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 2-meta-step run (save_every=1, log_every=1) in its own folder."""
    folder = str(tmp_path_factory.mktemp("trained"))
    args = tiny_args(out_dir=folder)
    result = meta_train(args, TASKS, folder)
    return SimpleNamespace(folder=folder, path=os.path.join(folder, "optimizer.msgpack"), args=args,
                           lopt_params=result.lopt_params, init_params=result.init_params)


@pytest.fixture(scope="module")
def full4(tmp_path_factory):
    """The tiny run taken to 4 meta-steps in one go: what resumed and time-limited runs must reproduce."""
    folder = str(tmp_path_factory.mktemp("full4"))
    return SimpleNamespace(folder=folder, result=meta_train(tiny_args(meta_steps=4), TASKS, folder))


def saved_train_state(folder: str):
    """(meta-step, leaves, header) of a run's saved train state."""
    header, leaves = tl.load_arrays(os.path.join(folder, tl.TRAIN_STATE))
    return header["meta_step"], leaves, header


# ------------------------------------------------------------------------------------------------
# 1. Gradient processing
# ------------------------------------------------------------------------------------------------


def test_process_gradient_values():
    """(sign g, log(|g| + 1e-18)) over 12 orders of magnitude, zero and negatives; finite at g = 0."""
    g = np.array([0.0, 1e-12, -1e-12, 3e-9, -2e-6, 1e-3, -0.5, 1.0, -1.0], np.float32)
    sign, log_abs = process_gradient(jnp.asarray(g))
    np.testing.assert_array_equal(sign, np.sign(g))
    np.testing.assert_allclose(log_abs, np.log(np.abs(g).astype(np.float64) + 1e-18), rtol=1e-6)
    assert np.all(np.isfinite(log_abs)) and log_abs[0] == pytest.approx(np.log(1e-18), rel=1e-6)
    assert log_abs[0] < log_abs[1]  # zero stays below the smallest gradient, not clamped onto it


def test_process_gradient_stops_gradient():
    """The optimizer's inputs are constants to the meta-gradient: d(features)/dg is zero."""
    g = jnp.array([0.3, -2.0, 1e-5, 0.0])
    d = jax.grad(lambda g: sum(jnp.sum(x * x) for x in process_gradient(g)))(g)
    np.testing.assert_array_equal(d, 0.0)
    d = jax.grad(lambda g: jnp.sum(tl.l2l_features(g) ** 2))(g)
    np.testing.assert_array_equal(d, 0.0)


@pytest.mark.parametrize("cls, rnn, processed_in", [(Optim4RL, "rnn_m", 2), (L2L, "rnn", 2), (LinearOptim, "rnn", 2)])
def test_raw_gradient_input_path(cls, rnn, processed_in):
    """grad_processing=False feeds raw g (1 input feature) instead of 2 processed features, and still runs."""
    for processing, in_dim in [(True, processed_in), (False, 1)]:
        net = cls(hidden_size=8, grad_processing=processing)
        params = init_lopt_params(net, jax.random.PRNGKey(0))
        assert params["params"][rnn]["ir"]["kernel"].shape == (in_dim, 8)
        if cls is Optim4RL:  # the second-moment RNN always sees one feature: 2 log|g| or g^2
            assert params["params"]["rnn_v"]["ir"]["kernel"].shape == (1, 8)
        carry, out = net.apply(params, initial_carry(net, 3), jnp.array([0.5, -1e-4, 0.0]))
        assert out.shape == (3,) and np.all(np.isfinite(out))
    # Same weights, different inputs: perturbed raw and processed Optim4RL disagree on a tiny gradient.
    if cls is Optim4RL:
        outs = []
        for processing in (True, False):
            net = cls(hidden_size=8, grad_processing=processing)
            p = init_lopt_params(net, jax.random.PRNGKey(0))
            p = jax.tree.map(lambda x: x + 0.5, p)
            outs.append(net.apply(p, initial_carry(net, 1), jnp.array([1e-6]))[1])
        assert not np.allclose(outs[0], outs[1], rtol=1e-3)


# ------------------------------------------------------------------------------------------------
# 2-3. The learned optimizers as optax transformations
# ------------------------------------------------------------------------------------------------

GRADS = {"a": jnp.array([[0.3, -2.0, 0.0], [1e-7, -1e-3, 5.0]]), "b": jnp.array([-0.7, 4e-6, 1.0, -1e-9])}


def test_optim4rl_at_init_is_sign_sgd():
    """Zero-initialised output layers: the first update is -lr * sign(g), leaf by leaf, shapes kept."""
    net = Optim4RL(hidden_size=8)
    tx = learned_optimizer(net, init_lopt_params(net, jax.random.PRNGKey(3)), 0.1)
    state = tx.init(GRADS)
    for _ in range(2):  # also after the recurrent state has moved
        updates, state = tx.update(GRADS, state)
        for k in GRADS:
            assert updates[k].shape == GRADS[k].shape
            np.testing.assert_allclose(updates[k], -0.1 * np.sign(GRADS[k]) * SIGN_SGD, rtol=1e-6)


@pytest.mark.parametrize("lopt, num_rnns", [("optim4rl", 2), ("l2l", 1), ("linear", 1)])
def test_state_carry_shapes(lopt, num_rnns):
    """One recurrent state per RNN, one row per parameter coordinate (here 6 + 4 = 10)."""
    net = make_lopt_net(dict(lopt=lopt, hidden_size=8, grad_processing=True))
    tx = learned_optimizer(net, init_lopt_params(net, jax.random.PRNGKey(0)), 0.1)
    state = tx.init(GRADS)
    assert len(state.carry) == num_rnns and all(c.shape == (10, 8) for c in state.carry)
    updates, state = tx.update(GRADS, state)
    assert len(state.carry) == num_rnns and all(c.shape == (10, 8) for c in state.carry)
    assert any(np.any(c != 0) for c in state.carry)  # the state is actually updated
    flat = np.concatenate([np.ravel(updates["a"]), np.ravel(updates["b"])])
    g = np.concatenate([np.ravel(GRADS["a"]), np.ravel(GRADS["b"])])
    expected = {"optim4rl": -0.1 * np.sign(g) * SIGN_SGD, "l2l": 0.0 * g, "linear": -0.1 * g}[lopt]
    np.testing.assert_allclose(flat, expected, rtol=1e-6, atol=1e-12)  # l2l starts at 0, linear at SGD


def test_coordinate_gru_matches_flax_gru():
    """CoordinateGRUCell is nn.GRUCell with its matmuls written coordinate-wise and a custom gradient: same
    parameters (so checkpoints carry over), same outputs, same gradients w.r.t. parameters, carry and inputs,
    also under vmap (the meta-step vmaps over agents)."""
    import flax.linen as nn

    init = nn.initializers.variance_scaling(0.01, "fan_in", "normal")
    ours, ref = tl.CoordinateGRUCell(8, kernel_init=init), nn.GRUCell(8, kernel_init=init)
    h = jax.random.normal(jax.random.PRNGKey(0), (3, 20, 8))  # (agents, coordinates, hidden)
    x = 5.0 * jax.random.normal(jax.random.PRNGKey(1), (3, 20, 2))
    params = ours.init(jax.random.PRNGKey(2), h[0], x[0])
    leaves_equal(params, ref.init(jax.random.PRNGKey(2), h[0], x[0]), atol=0.0)
    params = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(jax.random.PRNGKey(3), p.shape), params)

    def loss(cell, params, h, x):
        new_h = jax.vmap(lambda h, x: cell.apply(params, h, x)[0])(h, x)
        return jnp.sum(jnp.sin(3.0 * new_h))

    np.testing.assert_allclose(jax.jit(partial(loss, ours))(params, h, x), jax.jit(partial(loss, ref))(params, h, x),
                               rtol=1e-5)
    grads_ours = jax.jit(jax.grad(partial(loss, ours), argnums=(0, 1, 2)))(params, h, x)
    grads_ref = jax.jit(jax.grad(partial(loss, ref), argnums=(0, 1, 2)))(params, h, x)
    assert jax.tree.structure(grads_ours) == jax.tree.structure(grads_ref)
    for a, b in zip(jax.tree.leaves(grads_ours), jax.tree.leaves(grads_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)  # float32 sums in another order


def test_rematerialized_optimizer_matches_plain():
    """Meta-training rematerialises each update of the optimizer network: same updates, state and gradient
    w.r.t. the optimizer's parameters as the plain transformation."""
    net = Optim4RL()
    lopt_params = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.PRNGKey(5), x.shape),
                               init_lopt_params(net, jax.random.PRNGKey(0)))
    grads = {"a": jax.random.normal(jax.random.PRNGKey(1), (7,)) * 1e-3, "b": jnp.array([2.0, -3e-6, 0.0])}

    def run(rematerialize):
        def loss(p):
            tx = learned_optimizer(net, p, 0.1, rematerialize)
            state = tx.init(grads)
            total = 0.0
            for _ in range(2):  # the second step reads the state the first wrote
                updates, state = tx.update(grads, state)
                total += sum(jnp.sum(u**2) for u in jax.tree.leaves(updates))
            return total, state
        return jax.jit(jax.value_and_grad(loss, has_aux=True))(lopt_params)  # one program, not op by op

    (loss_plain, state_plain), grad_plain = run(False)
    (loss_remat, state_remat), grad_remat = run(True)
    np.testing.assert_allclose(loss_remat, loss_plain, rtol=1e-6)
    leaves_equal(state_remat, state_plain, atol=1e-6)
    for a, b in zip(jax.tree.leaves(grad_remat), jax.tree.leaves(grad_plain)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)  # float32 sums, possibly reordered


def test_any_baseline_steps_as_the_baseline_it_names():
    """any_baseline(i, lr), i traced inside one jitted program, takes BASELINES[i]'s steps over several updates and
    leaves the other baselines' states untouched."""
    params = {"w": jnp.array([0.5, -1.0, 2.0])}
    grads = [{"w": jnp.array([g, -3 * g, 1e-3])} for g in (0.2, -0.7, 1.5)]

    def steps(tx):
        state, out = tx.init(params), []
        for g in grads:
            update, state = tx.update(g, state, params)
            out.append(update["w"])
        return jnp.stack(out), state

    for i, name in enumerate(tl.BASELINES):
        got, state = jax.jit(lambda index: steps(tl.any_baseline(index, 3e-2)))(jnp.int32(i))
        expected, _ = steps(tl.baseline_optimizer(name, 3e-2))
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-9)
        untouched = [s for j, s in enumerate(state) if j != i]
        leaves_equal(untouched, [tl.baseline_optimizer(n, 3e-2).init(params) for j, n in enumerate(tl.BASELINES)
                                 if j != i])


def test_with_grad_clip_clips_elementwise():
    """with_grad_clip clips each gradient coordinate before the optimizer (LinearOptim at init = SGD)."""
    net = LinearOptim(hidden_size=8)
    base = learned_optimizer(net, init_lopt_params(net, jax.random.PRNGKey(0)), 0.1)
    g = {"w": jnp.array([5.0, -0.5, -3.0])}
    for clip, expected in [(1.0, [-0.1, 0.05, 0.1]), (None, [-0.5, 0.05, 0.3])]:
        tx = with_grad_clip(base, clip)
        updates, _ = tx.update(g, tx.init(g))
        np.testing.assert_allclose(updates["w"], expected, rtol=1e-6)


def test_normalized_step_is_sign_sgd_at_init_and_has_rms_lr_after_training():
    """normalize_step: the untrained Optim4RL is still sign-SGD; a perturbed one keeps its step's shape (up to a
    positive factor) with RMS lr over the coordinates that have a gradient, and zero gradients still do not move."""
    net = Optim4RL(hidden_size=8)
    params = init_lopt_params(net, jax.random.PRNGKey(0))
    g = {"w": jnp.array([0.0, 2.0, -1e-3, 5e-7]), "b": jnp.array([-0.3])}
    tx = learned_optimizer(net, params, 0.1, normalize_step=True)
    updates, _ = tx.update(g, tx.init(g))
    np.testing.assert_allclose(updates["w"], [0.0, -0.1, 0.1, -0.1], rtol=1e-6)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: x + 0.3 * rng.normal(size=x.shape), params)
    raw, _ = learned_optimizer(net, params, 0.1).update(g, tx.init(g))
    normalized, _ = learned_optimizer(net, params, 0.1, normalize_step=True).update(g, tx.init(g))
    raw, normalized = (np.concatenate([u["w"], u["b"]]) for u in (raw, normalized))
    assert normalized[0] == 0.0 and np.sqrt(np.mean(normalized[1:] ** 2)) == pytest.approx(0.1, rel=1e-5)
    np.testing.assert_allclose(raw[1:] / normalized[1:], raw[1] / normalized[1], rtol=1e-5)
    assert not np.allclose(np.abs(raw[1:]), 0.1)  # the perturbed step is not sign-SGD's, so the check has teeth


def test_step_spread_bounds_each_coordinate_around_its_tensors_mean():
    """step_spread s: every moving coordinate's |step| lies within [1/s, s] x its tensor's mean |step| (the mean over
    that tensor's moving coordinates of the unbounded step), signs kept; s = 1 gives one size per tensor; s = inf
    changes nothing; zero gradients still do not move."""
    net = Optim4RL(hidden_size=8)
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda x: x + 3.0 * rng.normal(size=x.shape), init_lopt_params(net, jax.random.PRNGKey(0)))
    g = {"a": jnp.asarray(np.r_[0.0, 10.0 ** rng.uniform(-7, 0, 31)] * rng.choice([-1, 1], 32)),
         "b": jnp.asarray(10.0 ** rng.uniform(-7, 0, 8))}

    def step(spread):
        tx = learned_optimizer(net, params, 0.1, normalize_step=True, step_spread=spread)
        return jax.tree.map(np.asarray, tx.update(g, tx.init(g))[0])

    free = step(math.inf)
    ratio = np.abs(free["a"][1:]) / np.abs(free["a"][1:]).mean()
    assert ratio.min() < 0.5 or ratio.max() > 2  # some coordinates lie outside the bound: the check has teeth
    for spread in (1.0, 2.0):
        bounded = step(spread)
        for name in g:
            moving = np.asarray(g[name]) != 0
            mean = np.abs(free[name][moving]).mean()
            ratio = np.abs(bounded[name][moving]) / mean
            assert np.all(ratio >= 1 / spread - 1e-5) and np.all(ratio <= spread + 1e-5)
            np.testing.assert_array_equal(np.sign(bounded[name]), np.sign(free[name]))
            inside = (np.abs(free[name]) >= mean / spread) & (np.abs(free[name]) <= mean * spread)
            np.testing.assert_allclose(bounded[name][inside], free[name][inside], rtol=1e-5)
        assert bounded["a"][0] == 0.0
    np.testing.assert_allclose(np.abs(step(1.0)["b"]), np.abs(free["b"]).mean(), rtol=1e-5)


def test_step_schedule_scales_the_step_by_its_factor_at_the_training_progress():
    """With knots v (log10 factors at progress 0, 1/(n-1), ..., 1), update t of a run of T is the unscheduled one
    times 10 ** interp(t / (T - 1), knots, v), and 10 ** v[-1] past the end; zero knots (meta-step 0) change
    nothing; the factor stays within 1e-2..1e2."""
    net = Optim4RL(hidden_size=8)
    rng = np.random.default_rng(2)
    plain = jax.tree.map(lambda x: x + rng.normal(size=x.shape), init_lopt_params(net, jax.random.PRNGKey(0)))
    g = {"w": jnp.asarray(rng.normal(size=6))}

    def steps(params, num_updates, count):
        tx = learned_optimizer(net, params, 0.1, normalize_step=True, num_updates=num_updates)
        state, out = tx.init(g), []
        for _ in range(count):
            update, state = tx.update(g, state)
            out.append(np.asarray(update["w"]))
        return np.array(out)

    unscheduled = steps(plain, None, 6)
    scheduled = lambda knots, count=6: steps(  # noqa: E731
        {"params": {**plain["params"], tl.STEP_SCHEDULE: jnp.asarray(knots, jnp.float32)}}, 5, count)
    np.testing.assert_allclose(scheduled([0.0, 0.0, 0.0]), unscheduled, rtol=1e-6)
    # T = 5 updates, knots at progress 0, 0.5, 1: updates 0..4 at progress 0, .25, .5, .75, 1; update 5 is past the end.
    expected = 10.0 ** np.array([0.0, -0.5, -1.0, -0.75, -0.5, -0.5])
    np.testing.assert_allclose(scheduled([0.0, -1.0, -0.5]), unscheduled * expected[:, None], rtol=1e-5)
    np.testing.assert_allclose(scheduled([-7.0, 7.0], 1), unscheduled[:1] * 1e-2, rtol=1e-5)  # clipped at 1e-2
    with pytest.raises(UserError, match="pass num_updates"):  # raised when the transform is built
        learned_optimizer(net, {"params": {**plain["params"], tl.STEP_SCHEDULE: jnp.zeros(2)}}, 0.1)


def test_checkpoint_keeps_step_schedule_and_load_optimizer_needs_num_updates(tmp_path):
    """A checkpoint of a --step-schedule run restores its knots; load_optimizer then asks for the run's length
    (a one-line UserError without it) and follows the schedule with it."""
    args = tiny_args(step_schedule=2)
    params = init_lopt_params(make_lopt_net(lopt_config(args)), jax.random.PRNGKey(0), 2)
    params["params"][tl.STEP_SCHEDULE] = jnp.array([0.0, -1.0])
    path = str(tmp_path / "scheduled.msgpack")
    tl.save_msgpack(path, tl.optimizer_checkpoint(args, params, params, 0))
    np.testing.assert_array_equal(tl.read_optimizer_checkpoint(path)["params"]["params"][tl.STEP_SCHEDULE], [0, -1])
    with pytest.raises(UserError, match="pass num_updates") as error:
        load_optimizer(path)
    assert "\n" not in str(error.value)
    tx = load_optimizer(path, learning_rate=0.01, num_updates=2)
    g = {"w": jnp.array([3.0, -0.2])}
    first, state = tx.update(g, tx.init(g))
    last, _ = tx.update(g, state)
    np.testing.assert_allclose(np.abs(first["w"]), 0.01, rtol=1e-5)  # sign-SGD at meta-step 0's network
    np.testing.assert_allclose(np.abs(last["w"]), 0.001, rtol=1e-5)  # the end of the schedule: a tenth


def new_and_old_checkpoint_steps(tmp_path, args, params, g, setting, **load) -> dict:
    """The first update of load_optimizer(lr 0.01) on g from a checkpoint of args ('new') and from the same checkpoint
    with `setting` removed from its config, as one written before that flag ('old')."""
    steps = {}
    for name, drop in (("new", False), ("old", True)):
        ckpt = tl.optimizer_checkpoint(args, params, params, 0)
        if drop:
            del ckpt["config"][setting]
        path = str(tmp_path / f"{name}.msgpack")
        tl.save_msgpack(path, ckpt)
        tx = load_optimizer(path, learning_rate=0.01, **load)
        steps[name] = np.asarray(tx.update(g, tx.init(g))[0]["w"])
    return steps


def test_checkpoint_keeps_step_spread_and_older_ones_load_unbounded(tmp_path):
    """step_spread is part of a checkpoint's config; a checkpoint without it (before the flag) loads unbounded."""
    args = tiny_args(step_spread=1.0)
    net = make_lopt_net(lopt_config(args))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: x + 3.0 * rng.normal(size=x.shape), init_lopt_params(net, jax.random.PRNGKey(0)))
    g = {"w": jnp.array([3.0, -0.2, 1e-4, 2e-7])}
    steps = new_and_old_checkpoint_steps(tmp_path, args, params, g, "step_spread")
    np.testing.assert_allclose(np.abs(steps["new"]), np.abs(steps["new"]).mean(), rtol=1e-5)  # one size
    assert np.abs(steps["old"]).max() / np.abs(steps["old"]).min() > 1.2  # unbounded: its own shape


def test_input_norm_tensor_reads_each_gradient_relative_to_its_tensors_mean(tmp_path):
    """input_norm 'tensor' and 'tensor_start': the step is unchanged when each tensor's gradients are multiplied by
    its own factor (1e3 and 1e-4; 1e-30 and 1e30, where squares would leave float32), over several updates, and zero
    gradients still do not move; with 'none' the same rescaling changes the step (the check has teeth).
    'tensor_start' reads every update against the first non-zero one's scale, so it agrees with 'tensor' on a
    tensor's first non-zero update and, once the gradients grow, not after. 'global' is unchanged by one factor on
    every tensor and changed by a factor per tensor. A checkpoint stores the choice, and one from before the flag
    loads as 'none'."""
    net = Optim4RL(hidden_size=8)
    rng = np.random.default_rng(3)
    params = jax.tree.map(lambda x: x + 3.0 * rng.normal(size=x.shape), init_lopt_params(net, jax.random.PRNGKey(0)))
    grads = [{"a": jnp.asarray(np.r_[0.0, rng.normal(size=7)]) * 3.0 ** i, "b": jnp.asarray(rng.normal(size=3) * 1e-3)}
             for i in range(3)]
    grads[0]["b"] = jnp.zeros(3)  # b's reference is its second update's scale
    rescale = lambda g, a, b: {"a": g["a"] * a, "b": g["b"] * b}  # noqa: E731

    def run(input_norm, a=1.0, b=1.0):
        tx = learned_optimizer(net, params, 0.1, normalize_step=True, input_norm=input_norm)
        state, out = tx.init(grads[0]), []
        for g in grads:
            update, state = tx.update(rescale(g, a, b), state)
            out.append(np.concatenate([update["a"], update["b"]]))
        return np.array(out)

    for input_norm in ("tensor", "tensor_start"):
        for a, b in ((1e3, 1e-4), (1e-30, 1e30)):
            np.testing.assert_allclose(run(input_norm, a, b), run(input_norm), rtol=2e-4, atol=1e-7)
        assert np.all(run(input_norm)[:, 0] == 0.0) and np.all(run(input_norm)[0, 8:] == 0.0)
    assert not np.allclose(run("none", 1e3, 1e-4), run("none"), rtol=1e-2)
    for scale in (1e3, 1e-30):  # 'global': one common factor divides out, per-tensor factors do not
        np.testing.assert_allclose(run("global", scale, scale), run("global"), rtol=2e-4, atol=1e-7)
    assert not np.allclose(run("global", 1e3, 1e-4)[:, 8:], run("global")[:, 8:], rtol=1e-2, atol=0)  # b's steps
    relative, from_start = run("tensor"), run("tensor_start")
    np.testing.assert_allclose(from_start[0], relative[0], rtol=1e-6)  # a's first update; b does not move
    ratio = from_start[1, 8:] / relative[1, 8:]  # b's first non-zero update, up to the normalisation over a and b
    np.testing.assert_allclose(ratio, ratio[0], rtol=1e-5)
    assert not np.allclose(from_start[1:, :8], relative[1:, :8], rtol=1e-2)  # a has grown 3x and 9x since
    with pytest.raises(UserError, match="input_norm 'layer': must be one of none, tensor, tensor_start, global"):
        learned_optimizer(net, params, 0.1, input_norm="layer")
    args = tiny_args(input_norm="tensor")
    assert lopt_config(args)["input_norm"] == "tensor"
    g = {"w": jnp.array([3.0, -0.2, 1e-4, 2e-7])}
    steps = new_and_old_checkpoint_steps(tmp_path, args, params, g, "input_norm", grad_clip=None)
    for name, input_norm in (("new", "tensor"), ("old", "none")):
        tx = learned_optimizer(net, params, 0.01, normalize_step=True, input_norm=input_norm)
        np.testing.assert_allclose(steps[name], np.asarray(tx.update(g, tx.init(g))[0]["w"]), rtol=1e-6)


@pytest.mark.parametrize("bias_m, bias_v", [(1e4, -1e4), (1e4, 1e4), (-1e4, -1e4), (-1e4, 1e4)])
def test_optim4rl_overflow_guard(bias_m, bias_v):
    """Huge output-layer biases (exponents of m and v) are clipped: updates stay finite for g in {0, 1e30}."""
    net = Optim4RL(hidden_size=8)
    params = jax.tree.map(jnp.asarray, init_lopt_params(net, jax.random.PRNGKey(0)))
    params["params"]["out_m"]["bias"] = jnp.full((1,), bias_m)
    params["params"]["out_v"]["bias"] = jnp.full((1,), bias_v)
    tx = learned_optimizer(net, params, 1.0)
    g = {"w": jnp.array([0.0, 1e30, -1e30, 1e-30, 1.0, -3e-12])}
    state = tx.init(g)
    for _ in range(3):
        updates, state = tx.update(g, state)
        assert np.all(np.isfinite(updates["w"])), updates
        assert all(np.all(np.isfinite(c)) for c in state.carry)
    assert updates["w"][0] == 0.0  # a zero gradient gives no step
    assert np.all(np.sign(updates["w"][1:]) == -np.sign(g["w"][1:]))


# ------------------------------------------------------------------------------------------------
# 4. Reset schedule
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, m", [(8, 72), (512, 576), (3, 10), (1, 5), (4, 4)])
def test_reset_offsets_pipeline(n, m):
    """Offsets are sorted, in [0, m), span it end to end, evenly spaced; each agent resets once per m steps."""
    offsets = reset_offsets(n, m, True)
    assert offsets.shape == (n,)
    assert np.all(np.diff(offsets) >= 0) and offsets.min() >= 0 and offsets.max() < m
    if n >= 2:
        assert offsets[0] == 0 and offsets[-1] == m - 1
        gaps = np.diff(offsets)
        assert gaps.max() - gaps.min() <= 1 and gaps.min() >= 1
    for start in (0, 37, 5 * m):  # any window of m consecutive meta-steps
        counts = sum(np.asarray(reset_mask(t, offsets, m), np.int32) for t in range(start, start + m))
        np.testing.assert_array_equal(counts, 1)
    # Jitted with a traced meta-step, as in meta_step.
    mask = jax.jit(lambda t: reset_mask(t, jnp.asarray(offsets), m))(jnp.int32(m + offsets[-1]))
    assert bool(mask[-1]) and int(mask.sum()) == int(np.sum(offsets == offsets[-1]))


def test_reset_offsets_no_pipeline():
    """pipeline=False: all agents reset together, exactly at multiples of the interval."""
    offsets = reset_offsets(6, 10, False)
    np.testing.assert_array_equal(offsets, 0)
    for t in range(35):
        mask = np.asarray(reset_mask(t, offsets, 10))
        assert mask.all() if t % 10 == 0 else not mask.any()


# ------------------------------------------------------------------------------------------------
# 5. TD(lambda) targets
# ------------------------------------------------------------------------------------------------


def lambda_return_reference(r, d, v, gamma, lam):
    """TD(lambda) from its definition: a lambda-weighted mix of n-step returns (no bootstrap past a done)."""
    T = len(r)

    def n_step(t, n):
        g, discount = 0.0, 1.0
        for k in range(t, t + n):
            g += discount * r[k]
            if d[k]:
                return g
            discount *= gamma
        return g + discount * v[t + n]

    out = []
    for t in range(T):
        horizon = T - t
        g = sum((1 - lam) * lam ** (n - 1) * n_step(t, n) for n in range(1, horizon))
        out.append(g + lam ** (horizon - 1) * n_step(t, horizon))
    return np.array(out)


R = np.array([1.0, -0.5, 2.0, 0.3, -1.0])
D = np.array([False, False, True, False, False])
V = np.array([0.5, 1.5, -2.0, 0.7, 0.4, 3.0])  # T + 1 values: the last one bootstraps


def test_lambda_returns_reference():
    """gamma 0.9, lambda 0.8, a done in the middle, against the n-step definition."""
    out = lambda_returns(jnp.asarray(R), jnp.asarray(D), jnp.asarray(V), 0.9, 0.8)
    np.testing.assert_allclose(out, lambda_return_reference(R, D, V, 0.9, 0.8), rtol=1e-5)
    assert out[2] == pytest.approx(2.0)  # the episode ends at t=2: its target is just the reward
    # Hand-computed for t=4 and t=3: G4 = -1 + 0.9 * 3 ; G3 = 0.3 + 0.9 * (0.2 * 0.4 + 0.8 * G4)
    assert out[4] == pytest.approx(1.7) and out[3] == pytest.approx(0.3 + 0.9 * (0.08 + 0.8 * 1.7))


def test_lambda_returns_limits():
    """lambda=0: one-step TD targets; lambda=1 without dones: discounted return + discounted bootstrap."""
    out0 = lambda_returns(jnp.asarray(R), jnp.asarray(D), jnp.asarray(V), 0.9, 0.0)
    np.testing.assert_allclose(out0, R + 0.9 * (1 - D) * V[1:], rtol=1e-6)
    no_done = np.zeros(5, bool)
    out1 = lambda_returns(jnp.asarray(R), jnp.asarray(no_done), jnp.asarray(V), 0.9, 1.0)
    mc = [sum(0.9 ** (k - t) * R[k] for k in range(t, 5)) + 0.9 ** (5 - t) * V[5] for t in range(5)]
    np.testing.assert_allclose(out1, mc, rtol=1e-6)


def test_lambda_returns_batched():
    """Time-major [T, E] inputs: each environment column is computed independently."""
    r = np.stack([R, R[::-1]], 1)
    d = np.stack([D, np.zeros(5, bool)], 1)
    v = np.stack([V, V[::-1]], 1)
    out = lambda_returns(jnp.asarray(r), jnp.asarray(d), jnp.asarray(v), 0.9, 0.8)
    for e in range(2):
        np.testing.assert_allclose(out[:, e], lambda_return_reference(r[:, e], d[:, e], v[:, e], 0.9, 0.8), rtol=1e-5)


def test_conv2x2_matches_flax_conv():
    """Conv2x2 is nn.Conv(F, (2, 2)) with SAME padding, computed as a matmul: same parameters, same output."""
    import flax.linen as nn

    x = jax.random.normal(jax.random.PRNGKey(0), (3, 5, 7, 4))  # odd, non-square grid: padding edges matter
    ours = tl.Conv2x2(6)
    params = ours.init(jax.random.PRNGKey(1), x)
    params["params"]["bias"] = jax.random.normal(jax.random.PRNGKey(2), (6,))
    ref = nn.Conv(6, (2, 2)).apply(params, x)
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, nn.Conv(6, (2, 2)).init(jax.random.PRNGKey(1), x))
    np.testing.assert_allclose(ours.apply(params, x), ref, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# 6. Meta-gradient against finite differences (float64)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lopt, step_schedule", [("optim4rl", 0), ("l2l", 0), ("linear", 0), ("optim4rl", 3)])
def test_meta_gradient_matches_finite_differences(lopt, step_schedule):
    """d loss(theta_K) / d phi through K=3 learned-optimizer steps (scan + jax.checkpoint) vs central FD; with a
    step schedule (and the normalised step it scales), its knots' gradient too."""
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        net = make_lopt_net(dict(lopt=lopt, hidden_size=8, grad_processing=True))
        phi0 = init_lopt_params(net, jax.random.PRNGKey(1), step_schedule)
        # Perturb so the output layers are non-zero and every parameter matters.
        phi0 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64)
                            + 0.1 * jnp.asarray(rng.normal(size=x.shape)), phi0)
        gs = jnp.asarray(rng.normal(size=(3, 5)) * 10.0 ** rng.uniform(-4, 0, size=(3, 5)))
        theta0 = jnp.asarray(rng.normal(size=5))
        target = jnp.asarray(rng.normal(size=5))

        def loss(phi):
            tx = learned_optimizer(net, phi, 0.3, normalize_step=step_schedule > 0, num_updates=4)

            def step(carry, g):
                theta, state = carry
                updates, state = tx.update(g, state)
                return (optax.apply_updates(theta, updates), state), None

            (theta, _), _ = jax.lax.scan(step, (theta0, tx.init(theta0)), gs)
            return jnp.sum((theta - target) ** 2)

        loss_fn = jax.jit(loss)
        grad = jax.jit(jax.grad(loss))(phi0)
        assert all(x.dtype == jnp.float64 for x in jax.tree.leaves(grad))
        assert float(optax.tree.norm(grad)) > 1e-6
        eps = 1e-6
        for i in range(3):
            direction = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape)), phi0)
            plus = loss_fn(jax.tree.map(lambda p, u: p + eps * u, phi0, direction))
            minus = loss_fn(jax.tree.map(lambda p, u: p - eps * u, phi0, direction))
            fd = float(plus - minus) / (2 * eps)
            ad = float(sum(jnp.vdot(g, u) for g, u in zip(jax.tree.leaves(grad), jax.tree.leaves(direction))))
            assert abs(ad - fd) <= 1e-4 * max(abs(fd), 1e-8), (i, ad, fd)


# ------------------------------------------------------------------------------------------------
# 7. Meta-steps on a tiny population
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("meta_value_coef,meta_loss_scale", [(0.5, "raw"), (0.0, "raw"), (0.5, "td")])
def test_meta_loss_terms_and_step_diagnostic(meta_value_coef, meta_loss_scale):
    """The meta-loss is policy + meta_value_coef * value - entropy_coef * entropy of its logged terms ('td': policy
    over the RMS TD error sqrt(value), value over its square); the logged step of the untrained optimizer (sign-SGD
    after the clip) is lopt_lr per moving coordinate and update."""
    args = tiny_args()
    task = tl.Task.make("catch", args)
    net = make_lopt_net(lopt_config(args))
    lopt_params = init_lopt_params(net, jax.random.PRNGKey(0))
    make_tx = lambda p: tl.clipped_learned_optimizer(net, p, args.lopt_lr, args.grad_clip)  # noqa: E731
    agent = tl.init_agent(task, make_tx(lopt_params), jax.random.PRNGKey(1))
    loss, (_, _, _, diagnostics) = jax.jit(partial(
        tl.agent_meta_loss, task=task, make_tx=make_tx, inner_updates=2, meta_value_coef=meta_value_coef,
        meta_loss_scale=meta_loss_scale))(
        lopt_params, agent=agent, reset_key=jax.random.PRNGKey(2), reset_now=jnp.array(False))
    policy, value, entropy, step = map(float, diagnostics)
    scale = np.sqrt(value) if meta_loss_scale == "td" else 1.0
    expected = policy / scale + meta_value_coef * value / scale**2 - task.entropy_coef * entropy
    assert float(loss) == pytest.approx(expected, rel=1e-4)
    assert value > 0 and entropy > 0 and step == pytest.approx(args.lopt_lr, rel=1e-3)


def test_grad_scale_range_multiplies_each_agents_gradient_before_the_optimizer():
    """--grad-scale-range R: the population's factors are 10^s, s evenly over [-R, R] (an antithetic pair shares
    one); an agent's inner updates see its gradient times its factor (plain SGD, no clip: the step scales with it)."""
    assert tl.population_grad_scales(8, 0.0) is None
    np.testing.assert_allclose(tl.population_grad_scales(2, 1.0), [0.1, 10.0], rtol=1e-6)
    np.testing.assert_allclose(tl.population_grad_scales(6, 2.0, pairs=2), [1e-2, 1e-2, 1.0, 1.0, 1e2, 1e2], rtol=1e-6)
    np.testing.assert_allclose(tl.population_grad_scales(1, 1.0), [1.0])
    args = tiny_args()
    task = tl.Task.make("catch", args)
    make_tx = lambda p: optax.sgd(1e-3)  # noqa: E731
    agent = tl.init_agent(task, make_tx(None), jax.random.PRNGKey(1))
    meta_loss = jax.jit(lambda scale: tl.agent_meta_loss(None, task, agent, jax.random.PRNGKey(2), jnp.array(False),
                                                         make_tx, inner_updates=1, grad_scale=scale))
    (loss_1, (_, _, _, diag_1)), (loss_10, (_, _, _, diag_10)) = meta_loss(1.0), meta_loss(10.0)
    assert float(diag_10[3]) == pytest.approx(10 * float(diag_1[3]), rel=1e-4)  # mean |change| per moving coordinate
    assert float(diag_1[3]) > 0 and float(loss_10) != float(loss_1)


def test_meta_steps_update_lopt(meta):
    """3 meta-steps: counter 3, finite meta-gradients, lopt params changed and finite, agents finite."""
    state = meta.state
    assert int(state.meta_step) == 3
    assert all(bool(m["grad_finite"]) for m in meta.metrics)
    assert all(np.isfinite(m["tasks"][0]["meta_loss"]) for m in meta.metrics)
    assert tree_finite(state.lopt_params) and tree_finite(state.populations[0].params)
    diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - b))), state.lopt_params, meta.init_params)
    assert max(jax.tree.leaves(diffs)) > 1e-4
    # The output layers started at zero and have moved: the optimizer is no longer plain sign-SGD.
    assert np.any(np.asarray(state.lopt_params["params"]["out_m"]["kernel"]) != 0)
    # The population is num_agents agents stacked on a leading axis.
    assert all(x.shape[0] == 2 for x in jax.tree.leaves(state.populations[0].params))


def test_population_meta_gradient(meta):
    """The meta-gradient of a task's population w.r.t. the lopt params: finite and non-zero in every module. With
    one agent per chunk (a scan over agents) it equals the whole population's at once (2 agents): the loss, the
    gradient and the updated agents, in agent order."""
    task, state = meta.mt.tasks[0], meta.state
    inputs = (state.lopt_params, state.populations[0], jax.random.PRNGKey(7), state.meta_step)
    results = {}
    for chunk in (None, 1):
        mt = meta.mt if chunk is None else tl.make_meta_train(tiny_args(agents_per_chunk=chunk), TASKS)
        results[chunk] = jax.jit(lambda *a, mt=mt: mt.population_meta_grad(a[0], task, *a[1:]))(*inputs)
    (loss, (population, return_sum, return_count, diagnostics)), grads = results[None]
    assert tree_finite(grads) and diagnostics.shape == (len(tl.META_DIAGNOSTICS),) and tree_finite(diagnostics)
    for module, g in grads["params"].items():
        assert float(optax.tree.norm(g)) > 0, module
    assert tree_finite(population.params)
    assert return_sum.shape == (2,) and return_count.shape == (2,)
    leaves_equal(results[1], results[None], atol=1e-6)
    # The same as the code before the meta-step's speed-only changes (the coordinate chunks' lax.map, commit
    # 0b828b2), recorded by tests/make_meta_gradient_fixture.py. The output biases' meta-gradients are zero up
    # to rounding (--normalize-step divides out any uniform scale), hence the absolute floor.
    recorded = load_msgpack(os.path.join(REPO, "tests", "data", "meta_gradient_tiny.msgpack"))
    np.testing.assert_allclose(loss, recorded["loss"], rtol=1e-5)
    recorded_grads = dict(jax.tree_util.tree_leaves_with_path(recorded["grads"]))
    ours = dict(jax.tree_util.tree_leaves_with_path(dict(grads)))
    assert ours.keys() == recorded_grads.keys()
    for path, g in ours.items():
        r = np.asarray(recorded_grads[path])
        np.testing.assert_allclose(g, r, rtol=0, atol=1e-4 * np.max(np.abs(r)) + 1e-8,
                                   err_msg=jax.tree_util.keystr(path))
    with pytest.raises(UserError, match="--num-agents 8 must be a multiple of --agents-per-chunk 3"):
        tl.make_meta_train(tiny_args(num_agents=8, agents_per_chunk=3), TASKS)
    with pytest.raises(UserError, match="--agents-per-chunk must be positive"):
        tl.make_meta_train(tiny_args(agents_per_chunk=-1), TASKS)


# ------------------------------------------------------------------------------------------------
# 8. Checkpoints
# ------------------------------------------------------------------------------------------------


def test_checkpoint_round_trip(trained):
    """optimizer.msgpack holds the final and initial params, the config and the meta-step."""
    ckpt = read_optimizer_checkpoint(trained.path)
    leaves_equal(ckpt["params"], trained.lopt_params)
    leaves_equal(ckpt["init_params"], trained.init_params)
    assert ckpt["config"] == lopt_config(trained.args)
    assert ckpt["meta_step"] == 2
    assert not np.allclose(ckpt["params"]["params"]["out_m"]["bias"], ckpt["init_params"]["params"]["out_m"]["bias"])
    tx = load_optimizer(trained.path)
    params = {"w": jnp.array([1.0, -2.0, 0.0])}
    updates, _ = tx.update(params, tx.init(params))
    assert np.all(np.isfinite(updates["w"])) and updates["w"][0] < 0 < updates["w"][1]
    assert saved_train_state(trained.folder)[0] == 2
    assert [int(r["meta_step"]) for r in read_rows(os.path.join(trained.folder, "metrics.csv"))] == [1, 2]


def test_checkpoint_corrupt_or_foreign(trained, tmp_path):
    """Truncated, random-byte and foreign msgpack files are UserErrors that name the file."""
    data = open(trained.path, "rb").read()
    truncated = tmp_path / "truncated.msgpack"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.msgpack"
    garbage.write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8)))
    foreign = tmp_path / "foreign.msgpack"
    save_msgpack(str(foreign), {"a": 1})
    missing = tmp_path / "missing.msgpack"
    for path in (truncated, garbage, foreign, missing):
        with pytest.raises(UserError, match=re.escape(str(path))):
            read_optimizer_checkpoint(str(path))
        with pytest.raises(UserError, match=re.escape(str(path))):
            load_optimizer(str(path))


def test_checkpoint_wrong_network(tmp_path):
    """A checkpoint whose params do not fit the network its config describes is a UserError."""
    config = lopt_config(tiny_args())
    other = init_lopt_params(make_lopt_net(dict(config, hidden_size=4)), jax.random.PRNGKey(0))
    path = tmp_path / "mismatch.msgpack"
    save_msgpack(str(path), {"config": config, "params": other})
    with pytest.raises(UserError, match="does not match"):
        read_optimizer_checkpoint(str(path))


@pytest.mark.parametrize("case", ["params_not_dict", "config_missing_key", "config_bad_type"])
def test_checkpoint_malformed_is_user_error(tmp_path, case):
    """Malformed-but-readable checkpoints should be UserErrors too (documented contract)."""
    config = lopt_config(tiny_args())
    params = init_lopt_params(make_lopt_net(config), jax.random.PRNGKey(0))
    tree = {
        "params_not_dict": {"config": config, "params": 5},
        "config_missing_key": {"config": {k: v for k, v in config.items() if k != "hidden_size"}, "params": params},
        "config_bad_type": {"config": dict(config, hidden_size="8"), "params": params},
    }[case]
    path = tmp_path / "malformed.msgpack"
    save_msgpack(str(path), tree)
    with pytest.raises(UserError):
        read_optimizer_checkpoint(str(path))


# ------------------------------------------------------------------------------------------------
# 9. Resuming
# ------------------------------------------------------------------------------------------------


def test_resume_matches_uninterrupted(trained, full4, tmp_path):
    """4 meta-steps in one go == 2 meta-steps (the `trained` run, copied) + resume to 4: identical state."""
    full, part = full4.folder, str(tmp_path / "part")
    full_params = full4.result.lopt_params
    shutil.copytree(trained.folder, part)
    with pytest.raises(UserError, match="already holds a run"):  # a new run may not overwrite it
        meta_train(tiny_args(meta_steps=4), TASKS, part)
    with pytest.raises(UserError, match="lopt_lr"):  # a changed setting is named
        meta_train(tiny_args(meta_steps=4, resume=True, lopt_lr=2e-3), TASKS, part)
    # The chunk size trades memory for speed only, so a run may resume with another one.
    assert tl.resume_settings(tiny_args(agents_per_chunk=1)) == tl.resume_settings(tiny_args())
    resumed = meta_train(tiny_args(meta_steps=4, resume=True), TASKS, part)
    leaves_equal(resumed.lopt_params, full_params, atol=1e-6)
    leaves_equal(resumed.init_params, trained.init_params)
    # The whole training state (agents, meta-optimizer state, key) matches too.
    leaves_equal(saved_train_state(part)[1], saved_train_state(full)[1], atol=1e-6)
    assert read_optimizer_checkpoint(os.path.join(part, "optimizer.msgpack"))["meta_step"] == 4
    rows = read_rows(os.path.join(part, "metrics.csv"))
    assert [int(r["meta_step"]) for r in rows] == [1, 2, 3, 4]
    assert [r["return/catch"] for r in rows] == [r["return/catch"] for r in read_rows(os.path.join(full, "metrics.csv"))]


def test_resume_compares_the_fields_not_marked_may_change(tmp_path):
    """The rule is declared on the Args fields: one annotated MayChange may differ on --resume, an unmarked one must
    match; a setting that a saved header lacks counts as the field's default, so an old run still resumes."""
    hints = typing.get_type_hints(Args, include_extras=True)
    marked = {name for name, hint in hints.items() if tl.MayChange in getattr(hint, "__metadata__", ())}
    assert marked == {"resume", "meta_steps", "save_every", "log_every", "eval_only", "lopt_path", "eval_tasks",
                      "eval_seeds", "eval_steps", "eval_envs", "max_bad_steps", "out_dir", "run_name", "distributed",
                      "coordinator_address", "num_processes", "process_id", "agents_per_chunk", "time_limit",
                      "final_eval", "val_every", "eval_open"}
    assert set(tl.resume_settings(tiny_args())) == {f.name for f in dataclasses.fields(Args)} - marked
    saved = tl.resume_settings(tiny_args())

    def restore(settings: dict, args: Args):
        header = {"settings": settings, "bad_steps": 0, "meta_step": 1}
        save_arrays(str(tmp_path / tl.TRAIN_STATE), header, [np.ones(3, np.float32)])
        with tl.Checkpointer(str(tmp_path), args) as checkpointer:
            return checkpointer.restore({"x": np.zeros(3, np.float32)})

    restore(saved, tiny_args(meta_steps=9, save_every=3))  # marked MayChange: skipped
    with pytest.raises(UserError, match="lopt_lr"):  # unmarked: compared
        restore(saved, tiny_args(lopt_lr=2e-3))
    older = {k: v for k, v in saved.items() if k != "entropy_coef"}  # a header from before --entropy-coef existed
    assert tiny_args().entropy_coef == Args().entropy_coef
    state, bad_steps = restore(older, tiny_args())  # at its default: resumes
    assert bad_steps == 0 and np.array_equal(state["x"], np.ones(3))
    with pytest.raises(UserError, match="entropy_coef"):  # not at its default: the saved run used the default
        restore(older, tiny_args(entropy_coef=0.1))


def test_logged_metrics_average_the_log_interval(trained, tmp_path):
    """With --log-every 2 the one row holds the mean meta-loss of the two meta-steps logged singly by `trained`."""
    folder = str(tmp_path / "run")
    meta_train(tiny_args(meta_steps=2, log_every=2), TASKS, folder)
    (row,) = read_rows(os.path.join(folder, "metrics.csv"))
    single = read_rows(os.path.join(trained.folder, "metrics.csv"))
    assert int(row["meta_step"]) == 2 and [int(r["meta_step"]) for r in single] == [1, 2]
    losses = [float(r["meta_loss/catch"]) for r in single]
    assert losses[0] != losses[1]  # otherwise the mean would not be told apart from either step
    np.testing.assert_allclose(float(row["meta_loss/catch"]), np.mean(losses), rtol=1e-6)


def test_resume_without_checkpoint_is_user_error(tmp_path):
    """--resume on a folder without a run names the missing file."""
    with pytest.raises(UserError, match="cannot resume .*nothing: no saved train state .*train_state.npy"):
        meta_train(tiny_args(resume=True), TASKS, str(tmp_path / "nothing"))
    assert not os.path.exists(tmp_path / "nothing")  # nothing was created that a new run would trip over


def test_resume_from_a_damaged_train_state_is_user_error(trained, tmp_path):
    folder = str(tmp_path / "run")
    shutil.copytree(trained.folder, folder)
    path = os.path.join(folder, tl.TRAIN_STATE)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(UserError, match="cannot read checkpoint .*train_state.npy"):
        meta_train(tiny_args(meta_steps=4, resume=True), TASKS, folder)


def test_resume_after_interrupt_before_first_log(tmp_path, monkeypatch):
    """Ctrl-C right after the step-1 checkpoint (log_every=2, nothing logged yet), then --resume."""
    folder = str(tmp_path / "run")
    real_save = tl.Checkpointer.save

    def save_then_interrupt(self, state, *rest):
        real_save(self, state, *rest)
        if int(state.meta_step) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(tl.Checkpointer, "save", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        meta_train(tiny_args(meta_steps=3, log_every=2), TASKS, folder)
    monkeypatch.setattr(tl.Checkpointer, "save", real_save)
    meta_train(tiny_args(meta_steps=3, log_every=2, resume=True), TASKS, folder)
    rows = read_rows(os.path.join(folder, "metrics.csv"))
    assert [int(r["meta_step"]) for r in rows] == [2, 3]
    assert all("return/catch" in r and None not in r for r in rows)


def test_full_disk_while_saving_is_a_user_error_and_keeps_the_last_checkpoint(trained, meta, tmp_path, monkeypatch):
    """The background write of the train state meets a full disk: Checkpointer.wait raises a UserError naming the
    file and the cause; the checkpoint saved before is unchanged and no temporary file is left."""
    folder = str(tmp_path / "run")
    shutil.copytree(trained.folder, folder)
    names = (tl.TRAIN_STATE, "optimizer.msgpack")
    before = {name: open(os.path.join(folder, name), "rb").read() for name in names}

    def full_disk(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full_disk)
    checkpointer = tl.Checkpointer(folder, trained.args)
    try:
        checkpointer.save(meta.state, meta.init_params, 0)  # meta-step 3, over the saved 2
        with pytest.raises(UserError) as info:
            checkpointer.wait()
    finally:
        checkpointer.writer.shutdown()
    assert str(info.value) == f"cannot write {os.path.join(folder, tl.TRAIN_STATE)}: No space left on device"
    monkeypatch.undo()
    assert {name: open(os.path.join(folder, name), "rb").read() for name in names} == before
    assert not [name for name in os.listdir(folder) if name.startswith(".tmp-")]


@pytest.mark.parametrize("signum", [signal.SIGTERM])  # SIGINT takes the same handler (test_common's StopSignals test)
def test_signal_stops_saves_and_resumes_to_the_same_result(signum, tmp_path):
    """SIGTERM (a scheduler's, or Ctrl-C's SIGINT) while `python train_lopt.py` meta-trains: it saves at the
    meta-step it stops after (far from --save-every), says so in one line, exits 128 + the signal without a traceback
    or the final evaluation; --resume then ends where an uninterrupted run does."""
    out, folder = tmp_path / "out", str(tmp_path / "out" / "run")
    flags = cli_flags({**TINY, "meta_steps": 100_000, "save_every": 100_000})
    cache = jax.config.jax_compilation_cache_dir  # conftest's: the tiny program is compiled there already
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=cache,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
    log = tmp_path / "log.txt"  # a file, not a pipe: one line per meta-step would fill a pipe nobody reads yet
    with open(log, "w") as log_file:
        proc = subprocess.Popen([sys.executable, "train_lopt.py", *flags, "--no-final-eval", "--out-dir", str(out),
                                 "--run-name", "run"], cwd=REPO, env=env, text=True, stdout=log_file,
                                stderr=subprocess.STDOUT)
        try:
            metrics, deadline = os.path.join(folder, "metrics.csv"), time.time() + 300
            while not (os.path.exists(metrics) and len(read_rows(metrics)) >= 2):  # the loop is running
                assert proc.poll() is None, log.read_text()[-2000:]
                assert time.time() < deadline, "no meta-step logged in time"
                time.sleep(0.2)
            proc.send_signal(signum)
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log.read_text()
    assert proc.returncode == 128 + signum, text[-2000:]
    assert "Traceback" not in text and "evaluating" not in text
    (line,) = [line for line in text.splitlines() if "interrupted" in line]
    name = signal.Signals(signum).name
    stopped = re.fullmatch(rf"error: interrupted by {name} after meta-step (\d+) of 100000: saved (.+); "
                           "continue with the same command and --resume", line)
    assert stopped and stopped[2] == folder, line
    n = int(stopped[1])
    assert n >= 2 and saved_train_state(folder)[0] == n
    assert read_optimizer_checkpoint(os.path.join(folder, "optimizer.msgpack"))["meta_step"] == n
    assert int(read_rows(os.path.join(folder, "metrics.csv"))[-1]["meta_step"]) == n
    assert not [f for f in os.listdir(folder) if f.startswith(".tmp-")]

    meta_train(tiny_args(meta_steps=n + 1, save_every=100_000, resume=True), TASKS, folder)
    full = str(tmp_path / "full")
    meta_train(tiny_args(meta_steps=n + 1, save_every=100_000), TASKS, full)
    resumed, uninterrupted = (read_optimizer_checkpoint(os.path.join(f, "optimizer.msgpack")) for f in (folder, full))
    assert resumed["meta_step"] == uninterrupted["meta_step"] == n + 1
    leaves_equal(resumed["params"], uninterrupted["params"], atol=1e-6)
    leaves_equal(saved_train_state(folder)[1], saved_train_state(full)[1], atol=1e-6)


# ------------------------------------------------------------------------------------------------
# 10. load_optimizer as a drop-in optax optimizer
# ------------------------------------------------------------------------------------------------


def test_load_optimizer_minimises_quadratic(trained):
    """Inside optax.chain and under jax.jit, the trained optimizer minimises sum(w^2) from w = 5."""
    tx = optax.chain(load_optimizer(trained.path, learning_rate=0.05), optax.identity())
    loss = lambda p: jnp.sum(p["w"] ** 2)  # noqa: E731

    @jax.jit
    def step(params, opt_state):
        updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    params = {"w": jnp.full(10, 5.0)}
    opt_state = tx.init(params)
    start = float(loss(params))
    for _ in range(200):
        params, opt_state = step(params, opt_state)
    assert float(loss(params)) <= start / 10
    assert tree_finite(params)


def test_load_optimizer_keeps_normalize_step(tmp_path):
    """A checkpoint meta-trained with --normalize-step loads as a normalising optimizer: its step has RMS lr."""
    args = tiny_args(normalize_step=True)
    net = make_lopt_net(lopt_config(args))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: x + 0.3 * rng.normal(size=x.shape), init_lopt_params(net, jax.random.PRNGKey(0)))
    path = str(tmp_path / "optimizer.msgpack")
    tl.save_msgpack(path, tl.optimizer_checkpoint(args, params, params, 0))
    g = {"w": jnp.array([3.0, -0.2, 1e-4, 2e-7])}
    tx = load_optimizer(path, learning_rate=0.01)
    step = np.asarray(tx.update(g, tx.init(g))[0]["w"])
    assert np.sqrt(np.mean(step**2)) == pytest.approx(0.01, rel=1e-5)


def test_load_optimizer_learning_rate(trained):
    """Default: the meta-trained lopt_lr (the tiny run stays close to sign-SGD); an override rescales it."""
    params = {"w": jnp.array([3.0, -0.2, 1e-4])}
    first = {}
    for lr in (None, 0.01, 0.001):
        tx = load_optimizer(trained.path, learning_rate=lr)
        first[lr] = np.asarray(tx.update(params, tx.init(params))[0]["w"])
    np.testing.assert_allclose(first[0.01], 10 * first[0.001], rtol=1e-5)
    np.testing.assert_allclose(first[None], trained.args.lopt_lr / 1e-3 * first[0.001], rtol=1e-5)
    np.testing.assert_allclose(np.abs(first[0.001]), 1e-3, rtol=0.2)  # still close to sign-SGD
    assert np.all(np.sign(first[0.001]) == -np.sign(params["w"]))


# ------------------------------------------------------------------------------------------------
# 11. Non-finite meta-gradients
# ------------------------------------------------------------------------------------------------


def test_non_finite_meta_gradients_stop_the_run(tmp_path):
    """lopt_lr=1e30 blows the agents up, so every meta-gradient is non-finite: after max_bad_steps=2 the
    run stops with a UserError, and the checkpoint written after the first step is intact and loadable."""
    folder = str(tmp_path / "bad")
    args = tiny_args(lopt_lr=1e30, max_bad_steps=2, meta_steps=5, save_every=1, log_every=10)
    with pytest.raises(UserError, match="non-finite") as error:
        meta_train(args, TASKS, folder)
    assert "meta-step 2" in str(error.value) and folder in str(error.value)
    ckpt = read_optimizer_checkpoint(os.path.join(folder, "optimizer.msgpack"))
    assert ckpt["meta_step"] == 1
    assert tree_finite(ckpt["params"])
    leaves_equal(ckpt["params"], ckpt["init_params"])  # non-finite meta-gradients were not applied
    assert saved_train_state(folder)[2]["bad_steps"] == 1
    tx = load_optimizer(os.path.join(folder, "optimizer.msgpack"), learning_rate=0.1)
    g = {"w": jnp.array([1.0, -1.0])}
    np.testing.assert_allclose(tx.update(g, tx.init(g))[0]["w"], [-0.1 * SIGN_SGD, 0.1 * SIGN_SGD], rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# 11b. Sharding: the result does not depend on the device count
# ------------------------------------------------------------------------------------------------


def test_two_devices_match_one(trained, tmp_path):
    """The tiny run on 2 simulated CPU devices (population split 1 + 1) ends with the 1-device meta-parameters."""
    script = f"""
import dataclasses, jax, train_lopt as tl
from common import UserError
assert jax.device_count() == 2, jax.devices()
try:
    tl.make_meta_train(dataclasses.replace(tl.Args(), num_agents=3, agents_per_chunk=None), ("catch",))
except UserError as error:
    print("uneven:", error)
args = dataclasses.replace(tl.Args(), **{TINY!r}, out_dir={str(tmp_path)!r})
tl.meta_train(args, {TASKS!r}, {str(tmp_path)!r})
"""
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, text=True, capture_output=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "uneven: --num-agents 3 must be a multiple of the device count (2)" in proc.stdout
    two = read_optimizer_checkpoint(os.path.join(str(tmp_path), "optimizer.msgpack"))
    assert two["meta_step"] == trained.args.meta_steps
    moved = [np.abs(np.asarray(a) - np.asarray(b)).max() for a, b in zip(jax.tree.leaves(two["params"]),
                                                                        jax.tree.leaves(two["init_params"]))]
    assert max(moved) > 1e-4  # it did train: equality is not two untouched initialisations
    # Compared by the steps they take: under --normalize-step the output layers' biases only scale the step, which
    # the normalisation divides out, so their meta-gradient is 0 up to rounding, and meta-Adam turns that rounding
    # into steps of either sign. Everything the optimizer does is the same.
    rng = np.random.default_rng(0)
    grads = [{"w": jnp.asarray(rng.normal(size=64) * 10.0 ** rng.uniform(-6, 0, 64), jnp.float32)} for _ in range(3)]
    steps = []
    for path in (os.path.join(str(tmp_path), "optimizer.msgpack"), trained.path):
        tx = load_optimizer(path)
        state = tx.init(grads[0])
        for g in grads:
            update, state = tx.update(g, state)
        steps.append(np.asarray(update["w"]))
    np.testing.assert_allclose(steps[0], steps[1], rtol=1e-4, atol=1e-9)
    # Training moved the steps from sign-SGD's (all lr) by 10x more than the tolerance above: the check has teeth.
    assert np.max(np.abs(np.abs(steps[1]) / trained.args.lopt_lr - 1.0)) > 1e-3


# ------------------------------------------------------------------------------------------------
# 12. End to end: main() with evaluation, then --eval-only
# ------------------------------------------------------------------------------------------------


def test_main_end_to_end(tmp_path):
    """main(): meta-train, save, plot, evaluate (OPEN too); then eval-only from the checkpoint reproduces the
    numbers."""
    out = str(tmp_path)
    tl.main(tiny_args(out_dir=out, run_name="run", eval_open=True))
    folder = os.path.join(out, "run")
    for name in ("optimizer.msgpack", "metrics.csv", "meta_training.png", "eval.json", "args.json"):
        assert os.path.getsize(os.path.join(folder, name)) > 0, name
    report = json.load(open(os.path.join(folder, "eval.json")))
    assert set(report["tasks"]) == set(TASKS)
    for task, results in report["tasks"].items():
        assert set(results["returns"]) == set(EVAL_NAMES)
        for name, returns in results["returns"].items():  # per-seed final returns, all finite
            assert len(returns) == TINY["eval_seeds"] and all(math.isfinite(v) for v in returns), (name, returns)
        assert results["lr"]["lopt"] == results["lr"]["lopt_init"] == tl.Args.lopt_lr
        for name in tl.TUNED:  # each baseline and OPEN was swept over at least the whole grid, and picked from it
            assert set(map(float, results["lr_sweep"][name])) >= set(tl.LR_GRID)
            assert results["lr"][name] in map(float, results["lr_sweep"][name])
        iqm, low, high = results["normalized_iqm_ci"]["lopt"]
        assert low <= iqm <= high
    assert report["lopt_path"] == "optimizer.msgpack"  # outside the repository: recorded by name alone

    tl.main(tiny_args(out_dir=out, run_name="again", eval_only=True, eval_open=True,
                      lopt_path=os.path.join(folder, "optimizer.msgpack")))
    again = json.load(open(os.path.join(out, "again", "eval.json")))
    assert set(os.listdir(os.path.join(out, "again"))) == {"eval.json"}  # nothing trained
    for task in TASKS:
        for name in EVAL_NAMES:
            np.testing.assert_allclose(again["tasks"][task]["returns"][name], report["tasks"][task]["returns"][name],
                                       rtol=1e-5, atol=1e-6)


def test_meta_tasks_small_trains_on_the_small_grids_and_evaluates_the_group(tmp_path, monkeypatch):
    """--meta-tasks small: meta-training and validation see only the group's small gridworlds; --eval-tasks group
    evaluates the whole group; 'all' and groups without small grids meta-train on everything."""
    group = ENV_GROUPS["gridworld"]
    assert tl.meta_task_names(tiny_args(meta_tasks="small"), group) == ("small_dense_long", "small_dense_short")
    assert tl.meta_task_names(tiny_args(meta_tasks="all"), group) == group
    assert tl.meta_task_names(tiny_args(meta_tasks="small"), ("catch",)) == ("catch",)
    every = tl.meta_task_names(tiny_args(meta_tasks="every"), group)
    assert len(every) == 9 and set(every) == {*tl.GRIDWORLDS, "catch"}
    assert tl.parse_args([]).meta_tasks == "small" and tl.parse_args(["--preset", "paper"]).meta_tasks == "all"
    assert tl.parse_args([]).eval_tasks == "meta" and tl.parse_args(["--preset", "paper"]).eval_tasks == "group"

    # main() on a cheap mixed group: meta-training for real; validation and evaluation record their tasks only
    # (both are tested elsewhere, and compiling them for a gridworld would take minutes).
    seen = {}

    class Evaluation:
        def __init__(self, args, task_names, config, evaluators):
            seen["evaluated"] = tuple(task_names)

        def prepare(self, init_params, deadline=None, log=print):
            pass

        def seconds(self):
            return 0.0

        def finish(self, lopt_params, log=print):
            return {}

    monkeypatch.setattr(tl, "FinalEvaluation", Evaluation)
    monkeypatch.setattr(tl, "write_eval", lambda *args: None)
    monkeypatch.setattr(tl, "format_eval_table", lambda *args: "")
    monkeypatch.setattr(tl.Validator, "__init__", lambda self, args, task_names, *rest: seen.update(validated=task_names))
    monkeypatch.setattr(tl.Validator, "__call__", lambda self, lopt_params, deadline=None: 0.5)
    monkeypatch.setitem(ENV_GROUPS, "catch", ("catch", "small_dense_short"))
    tl.main(tiny_args(out_dir=str(tmp_path), run_name="run", val_every=1, eval_tasks="group"))
    columns = tl.read_metrics(str(tmp_path / "run" / "metrics.csv"))[0].keys()
    assert "return/small_dense_short" in columns and "return/catch" not in columns
    assert seen == {"validated": ("small_dense_short",), "evaluated": ("catch", "small_dense_short")}


def test_eval_only_needs_lopt_path(tmp_path):
    with pytest.raises(UserError, match="--lopt-path"):
        tl.main(tiny_args(out_dir=str(tmp_path), eval_only=True, lopt_path=None))


def test_shipped_checkpoint_is_the_default_and_steps_under_jit():
    """checkpoints/optim4rl_gridworld.msgpack: the default --lopt-path; it records how it was trained and,
    loaded through load_optimizer, takes finite, non-zero jitted steps inside optax.chain."""
    assert Args().lopt_path == tl.PRETRAINED_OPTIMIZER and os.path.exists(tl.PRETRAINED_OPTIMIZER)
    ckpt = read_optimizer_checkpoint(tl.PRETRAINED_OPTIMIZER)
    assert ckpt["config"]["lopt"] == "optim4rl" and ckpt["meta_step"] > 0
    saved = load_msgpack(tl.PRETRAINED_OPTIMIZER)
    assert saved["command"].startswith("python train_lopt.py") and json.loads(saved["settings"])["env_group"] == "gridworld"
    tx = optax.chain(load_optimizer(tl.PRETRAINED_OPTIMIZER), optax.scale(1.0))
    params = {"w": jnp.linspace(-1.0, 1.0, 7), "b": jnp.zeros(())}
    grads = {"w": jnp.array([1e-6, -1e-4, 1e-2, 0.0, 1.0, -1.0, 5.0]), "b": jnp.array(3e-3)}

    @jax.jit
    def step(params, state):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    new_params, state = step(params, tx.init(params))
    new_params, state = step(new_params, state)
    delta = np.asarray(new_params["w"] - params["w"])
    assert np.all(np.isfinite(delta)) and tree_finite(state)
    nonzero = np.asarray(grads["w"]) != 0
    assert np.all(np.sign(delta[nonzero]) == -np.sign(np.asarray(grads["w"])[nonzero]))  # Optim4RL: m follows sign(g)


# ------------------------------------------------------------------------------------------------
# 13. Command line
# ------------------------------------------------------------------------------------------------


CLI_CASES = {
    "bad_env_group": ["--env-group", "nope"],
    "bad_lopt": ["--lopt", "nope"],
    "missing_ckpt": ["--eval-only", "--lopt-path", "/nonexistent.msgpack", "--env-group", "small_dense_short"],
    "corrupt_ckpt": ["--eval-only", "--lopt-path", "{corrupt}", "--env-group", "small_dense_short"],
    "help": ["--help"],
}


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """Every CLI case as `python train_lopt.py ...` (tests/script_cases.py: one process for all of them)."""
    folder = tmp_path_factory.mktemp("cli")
    corrupt = folder / "corrupt.msgpack"
    corrupt.write_bytes(b"\xc1\xc1 this is not msgpack")
    cases = {name: [a.format(corrupt=corrupt) for a in argv] + ["--out-dir", str(folder)]
             for name, argv in CLI_CASES.items()}
    results = script_cases.run("train_lopt.py", cases)
    results["corrupt_path"] = str(corrupt)
    return results


def test_parse_args_presets():
    """Presets set defaults; explicit flags win; --no-pipeline turns the pipeline off."""
    assert tl.parse_args([]).num_agents == Args().num_agents
    paper = tl.parse_args(["--preset", "paper"])
    assert (paper.num_agents, paper.meta_steps, paper.reset_interval) == (512, 586, 144)
    mixed = tl.parse_args(["--preset=paper", "--num-agents", "3", "--no-pipeline"])
    assert (mixed.num_agents, mixed.meta_steps, mixed.pipeline) == (3, 586, False)


@pytest.mark.parametrize("case, choice", [("bad_env_group", "gridworld"), ("bad_lopt", "optim4rl")])
def test_cli_invalid_choice(cli, case, choice):
    """An invalid choice exits non-zero and lists the valid ones, without a traceback."""
    proc = cli[case]
    assert proc.returncode != 0
    assert choice in proc.stderr and "nope" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


@pytest.mark.parametrize("case", ["missing_ckpt", "corrupt_ckpt"])
def test_cli_missing_and_corrupt_checkpoint(cli, case):
    """--eval-only with a missing or corrupt --lopt-path: exit 2, one stderr line naming the file."""
    proc = cli[case]
    path = "/nonexistent.msgpack" if case == "missing_ckpt" else cli["corrupt_path"]
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and path in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_help(cli):
    proc = cli["help"]
    assert proc.returncode == 0
    assert "--num-agents" in proc.stdout and "--no-pipeline" in proc.stdout and "--lopt-path" in proc.stdout


# ------------------------------------------------------------------------------------------------
# 14. Careless flag values: one line naming the flag, before anything compiles
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags, named", [
    (["--num-agents", "0"], "--num-agents 0"),  # not reported as a problem with --agents-per-chunk
    (["--num-agents", "-3"], "--num-agents -3"),
    (["--agents-per-chunk", "0"], "--agents-per-chunk 0"),
    (["--num-agents", "6", "--agents-per-chunk", "4"], "--num-agents 6 must be a multiple of --agents-per-chunk 4"),
    (["--num-envs", "0"], "--num-envs 0"),
    (["--inner-updates", "0"], "--inner-updates 0"),
    (["--rollout-steps", "-1"], "--rollout-steps -1"),
    (["--reset-interval", "0"], "--reset-interval 0"),
    (["--meta-steps", "0"], "--meta-steps 0"),
    (["--meta-lr", "nan"], "--meta-lr nan"),
    (["--meta-lr", "-1e-3"], "--meta-lr -0.001"),
    (["--lopt-lr", "inf"], "--lopt-lr inf"),
    (["--lopt-lr", "0"], "--lopt-lr 0"),
    (["--meta-grad-clip", "0"], "--meta-grad-clip 0"),
    (["--grad-clip", "-1"], "--grad-clip -1"),
    (["--grad-clip", "nan"], "--grad-clip nan"),
    (["--gamma", "1.5"], "--gamma 1.5"),
    (["--gae-lambda", "nan"], "--gae-lambda nan"),
    (["--entropy-coef", "-0.01"], "--entropy-coef -0.01"),
    (["--hidden-size", "0"], "--hidden-size 0"),
    (["--save-every", "0"], "--save-every 0"),
    (["--log-every", "0"], "--log-every 0"),
    (["--max-bad-steps", "0"], "--max-bad-steps 0"),
    (["--eval-seeds", "0"], "--eval-seeds 0"),
    (["--eval-envs", "0"], "--eval-envs 0"),
    (["--eval-steps", "100"], "--eval-steps 100: must be at least one rollout"),  # 20 steps x 32 envs = 640
    (["--val-steps", "10"], "--val-steps 10: must be at least one rollout"),
    (["--val-seeds", "0"], "--val-seeds 0"),
    (["--val-every", "-1"], "--val-every -1"),
    (["--time-limit", "0"], "--time-limit 0"),
    (["--step-schedule", "1"], "--step-schedule 1: must be 0 (no schedule) or >= 2 knots"),
    (["--step-schedule", "-2"], "--step-schedule -2"),
    (["--grad-scale-range", "-1"], "--grad-scale-range -1.0: must be a finite number of decades >= 0"),
    (["--grad-scale-range", "inf"], "--grad-scale-range inf"),
    (["--seed", "-1"], "--seed -1: must be an integer in [0, 4294967295]"),
    (["--out-dir", "README.md/runs"], "--out-dir README.md/runs: cannot write there"),
])
def test_bad_settings_are_one_line_errors(flags, named, monkeypatch):
    """Each careless value is a UserError naming the flag and the value, raised by check_settings (parse time)."""
    monkeypatch.chdir(REPO)
    with pytest.raises(UserError) as error:
        tl.check_settings(tl.parse_args(flags))
    message = str(error.value)
    assert message.startswith(named) and "\n" not in message, message


def test_good_settings_pass_and_zero_val_every_turns_validation_off(tmp_path):
    tl.check_settings(tl.parse_args(["--out-dir", str(tmp_path)]))
    tl.check_settings(tl.parse_args(["--val-every", "0", "--grad-clip", "0", "--out-dir", str(tmp_path / "new")]))
    assert os.path.isdir(tmp_path / "new")  # an output folder that does not exist yet is created, not an error
    tl.check_settings(tl.parse_args(["--preset", "paper", "--out-dir", str(tmp_path)]))


def test_checkpoint_path_is_a_directory(tmp_path):
    with pytest.raises(UserError, match="is a directory"):
        read_optimizer_checkpoint(str(tmp_path))


# ------------------------------------------------------------------------------------------------
# 15. Validation during meta-training: the best optimizer is kept, survives resume, and loads
# ------------------------------------------------------------------------------------------------


def test_validation_and_evaluation_seeds_are_disjoint():
    """Validation agents never share a seed with the final evaluation's, for any task or seed count."""
    names = [*ENV_GROUPS["gridworld"], "catch"]
    for name in names:
        val = np.asarray(jax.random.key_data(tl.evaluation_keys(name, tl.VAL_STREAM, 16, "--val-seeds")))
        for other in names:
            evl = np.asarray(jax.random.key_data(tl.evaluation_keys(other, tl.EVAL_STREAM, 16, "--eval-seeds")))
            assert not any((v == e).all() for v in val for e in evl)
            if other != name:  # and tasks do not share agents either
                other_val = jax.random.key_data(tl.evaluation_keys(other, tl.VAL_STREAM, 16, "--val-seeds"))
                assert not any((v == o).all() for v in val for o in np.asarray(other_val))
    a = tl.evaluation_keys("catch", tl.EVAL_STREAM, 4, "--eval-seeds")
    np.testing.assert_array_equal(jax.random.key_data(a), jax.random.key_data(
        tl.evaluation_keys("catch", tl.EVAL_STREAM, 4, "--eval-seeds")))  # and they are reproducible


def test_a_task_is_scored_the_same_alone_in_a_group_and_for_any_meta_seed(tmp_path, monkeypatch):
    """The evaluation's agents belong to the task: the same optimizer on catch gives the same per-seed returns and
    picks the same learning rates evaluated alone with --seed 0 as second task of a group with --seed 5 (separate
    out-dirs, so nothing comes from a shared baseline cache). The group's first task only takes catch's place in
    the order: its evaluation is a stub (a gridworld's would compile for minutes)."""
    real_baselines, real_learned = tl.evaluate_baselines, tl.evaluate_learned
    stub = {"returns": {n: np.zeros(TINY["eval_seeds"]) for n in EVAL_NAMES}, "lr": {}, "sweeps": {}}

    def baselines(args, evaluator, init_params, cache):
        if evaluator.name == "catch":
            return real_baselines(args, evaluator, init_params, cache)
        evaluator.run_s.update({("lopt", 1, args.eval_seeds): 0.0, ("lopt", 1, args.val_seeds): 0.0})
        return stub

    def learned(args, evaluator, lopt_params, part):
        if evaluator.name == "catch":
            return real_learned(args, evaluator, lopt_params, part)
        return {"returns": stub["returns"], "lr": {n: None for n in EVAL_NAMES}, "lr_sweep": {}}

    monkeypatch.setattr(tl, "evaluate_baselines", baselines)
    monkeypatch.setattr(tl, "evaluate_learned", learned)
    settings = dict(eval_only=True, lopt_path=tl.PRETRAINED_OPTIMIZER)
    tl.main(tiny_args(out_dir=str(tmp_path / "a"), run_name="alone", **settings))
    monkeypatch.setitem(ENV_GROUPS, "catch", ("small_dense_short", "catch"))
    tl.main(tiny_args(out_dir=str(tmp_path / "b"), run_name="group", eval_tasks="group", seed=5, **settings))
    alone = json.load(open(tmp_path / "a" / "alone" / "eval.json"))["tasks"]
    group = json.load(open(tmp_path / "b" / "group" / "eval.json"))["tasks"]
    assert list(alone) == ["catch"] and list(group) == ["small_dense_short", "catch"]
    assert "open" not in alone["catch"]["returns"]  # --no-eval-open
    for name in alone["catch"]["returns"]:
        np.testing.assert_allclose(group["catch"]["returns"][name], alone["catch"]["returns"][name],
                                   rtol=1e-5, atol=1e-6)
    assert group["catch"]["lr"] == alone["catch"]["lr"]


def scripted_validation(monkeypatch, scores: dict):
    """Replace the validator's score by a script {meta-step: score}, recording which parameters it saw."""
    seen = {}

    def fake_init(self, args, task_names, evaluators=None, deadline=None, log=print):
        pass

    def fake_call(self, lopt_params, deadline=None):
        step = sorted(scores)[len(seen)]  # validations come in meta-step order
        seen[step] = jax.device_get(lopt_params)
        return scores[step]

    monkeypatch.setattr(tl.Validator, "__init__", fake_init)
    monkeypatch.setattr(tl.Validator, "__call__", fake_call)
    return seen


def test_validation_keeps_the_best_and_survives_resume(trained, tmp_path, monkeypatch):
    """Scores 0.2 (step 0), 0.9 (step 2), then 0.5 (step 4) after a resume: the step-2 optimizer stays the best,
    in optimizer_best.msgpack, in metrics.csv and as what main() would evaluate; it loads through load_optimizer."""
    folder = str(tmp_path / "run")
    seen = scripted_validation(monkeypatch, {0: 0.2, 2: 0.9})
    first = meta_train(tiny_args(val_every=2), TASKS, folder)
    assert (first.best_step, first.best_score) == (2, 0.9)
    best_path = os.path.join(folder, "optimizer_best.msgpack")
    best = read_optimizer_checkpoint(best_path)
    assert best["meta_step"] == 2 and load_msgpack(best_path)["val_score"] == 0.9
    leaves_equal(best["params"], seen[2])
    leaves_equal(best["params"], trained.lopt_params, atol=1e-6)  # the step-2 optimizer of the same run

    seen = scripted_validation(monkeypatch, {4: 0.5})  # resumed: no second step-0 validation
    # Under --time-limit the first validation of the resumed run, due after meta-step 4, is budgeted before it has
    # run in this process: with its estimate (Validator.seconds), not as free.
    monkeypatch.setattr(tl.Validator, "seconds", lambda self, deadline: 123.0)
    needed = []
    monkeypatch.setattr(tl.Deadline, "allows", lambda self, seconds: needed.append(seconds) or True)
    resumed = meta_train(tiny_args(val_every=2, meta_steps=4, resume=True, time_limit=1e6), TASKS, folder)
    assert len(needed) == 2 and needed[0] < 123.0 <= needed[1]
    assert list(seen) == [4] and (resumed.best_step, resumed.best_score) == (2, 0.9)
    leaves_equal(resumed.best_params, best["params"])
    assert read_optimizer_checkpoint(best_path)["meta_step"] == 2
    assert not np.allclose(jax.tree.leaves(resumed.lopt_params)[0], jax.tree.leaves(best["params"])[0])
    rows = read_rows(os.path.join(folder, "metrics.csv"))
    assert [(int(r["meta_step"]), r["val_score"]) for r in rows] == [(0, "0.2"), (1, ""), (2, "0.9"), (3, ""),
                                                                    (4, "0.5")]
    # Every validated optimizer stays a candidate, with its score and meta-step, the best one among them.
    candidates = {step: read_optimizer_checkpoint(tl.validated_path(folder, step)) for step in (0, 2, 4)}
    assert sorted(os.listdir(os.path.join(folder, tl.VALIDATED))) == [
        os.path.basename(tl.validated_path(folder, step)) for step in (0, 2, 4)]
    assert [(c["meta_step"], c["val_score"]) for c in candidates.values()] == [(0, 0.2), (2, 0.9), (4, 0.5)]
    leaves_equal(candidates[2]["params"], best["params"])
    leaves_equal(candidates[4]["params"], resumed.lopt_params)
    tx = load_optimizer(best_path)
    g = {"w": jnp.array([1.0, -1e-3])}
    updates, _ = tx.update(g, tx.init(g))
    assert np.all(np.isfinite(updates["w"])) and updates["w"][0] < 0 < updates["w"][1]


def test_validator_scores_against_its_baselines(tmp_path):
    """The real Validator on catch: scores are normalised by tuned Adam and random on the validation seeds (the same
    cached sweep the final evaluation uses), and equal parameters give equal scores (its trainer is compiled once,
    the parameters are an argument)."""
    args = tiny_args(val_seeds=2, val_steps=64, out_dir=str(tmp_path))
    validator = tl.Validator(args, TASKS, log=lambda *_: None)
    params = init_lopt_params(make_lopt_net(lopt_config(args)), jax.random.PRNGKey(0))
    score = validator(params)
    assert math.isfinite(score) and score == validator(params)
    returns = validator.evaluators["catch"].lopt(params, validator.keys["catch"])
    expected = np.mean(tl.normalized_scores({"lopt": returns, **validator.baselines["catch"]}, "lopt"))
    assert score == pytest.approx(expected)
    evaluator, cache = tl.TaskEvaluator(args, "catch", lopt_config(args), 64), tl.BaselineCache(str(tmp_path / "c"))
    best, sweep = tl.tune_learning_rate(lambda grid: cache.returns(evaluator, "adam", tl.VAL_STREAM, 2, grid),
                                        tl.LR_GRID)  # computed afresh in another cache folder
    np.testing.assert_allclose(validator.baselines["catch"]["adam"], sweep[best], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# 16. --time-limit: stop in time, save, and resume to the uninterrupted result
# ------------------------------------------------------------------------------------------------


def test_deadline_keeps_its_reserve_and_estimates_new_programs():
    deadline = tl.Deadline(100.0, tl.time.time() - 50.0)  # 50 s spent
    deadline.reserve = 25.0  # 25 s of work still fits, 30 does not
    assert deadline.allows(20.0) and not deadline.allows(30.0)
    assert tl.Deadline(None, 0.0).allows(1e9)  # no limit
    deadline.check(None, 10**6, "first run")  # nothing measured yet: the first run starts
    deadline.record(compile_s=5.0, run_s=2.0, work=100)
    deadline.record(compile_s=3.0, run_s=1.0, work=100)  # the longest compilation, the slowest rate: 5 s, 0.02 s
    deadline.check(20.0, 10**9, "a timed program")  # its own measured time, whatever its work
    deadline.check(None, 500, "new")  # 5 + 0.02 x 500 = 15 s
    with pytest.raises(tl.OutOfTime, match="a new one needs ~25s"):
        deadline.check(None, 1000, "a new one")  # 5 + 20 = 25 s > 25 s left


def test_evaluation_runs_inside_a_deadline_raise_before_starting(tmp_path):
    """A guarded evaluator times its runs less their compilation; a run of a timed program that would end past the
    deadline raises OutOfTime before it starts, and without the guard it runs."""
    args = tiny_args(out_dir=str(tmp_path))
    evaluators = tl.Evaluators(args)
    evaluator = evaluators("catch", lopt_config(args), 64)
    keys = tl.evaluation_keys("catch", tl.VAL_STREAM, 2, "--val-seeds")
    deadline = tl.Deadline(1e9, tl.time.time())
    with evaluators.guarded(deadline):
        evaluator.returns("adam", keys, [1e-3])
    assert 0 < evaluator.run_s[("baselines", 1, 2)] and deadline.s_per_work > 0
    deadline.limit = tl.time.time() - deadline.start  # no time left
    with evaluators.guarded(deadline), pytest.raises(tl.OutOfTime, match="catch: adam"):
        evaluator.returns("adam", keys, [1e-3])
    assert evaluator.deadline is None
    assert evaluator.returns("adam", keys, [1e-3]).shape == (1, 2)


def test_validation_time_is_its_programs_measured_time_or_the_deadlines_estimate():
    """Validator.seconds: a task whose validation program ran takes its last time, one that did not the deadline's
    estimate for a new program (the longest compilation plus its work at the slowest rate so far)."""
    validator = tl.Validator.__new__(tl.Validator)
    args = tiny_args()
    validator.evaluators = {n: tl.TaskEvaluator(args, "catch", tl.lopt_config(args), 64) for n in ("ran", "new")}
    validator.keys = {n: np.zeros((3, 2)) for n in validator.evaluators}
    validator.evaluators["ran"].run_s[("lopt", 1, 3)] = 2.5
    deadline = tl.Deadline(100.0, time.time())
    deadline.record(compile_s=4.0, run_s=1.0, work=100)
    work = 3 * validator.evaluators["new"].num_updates  # 1 lr x 3 seeds x updates
    assert validator.seconds(deadline) == pytest.approx(2.5 + 4.0 + work / 100)


def test_time_limit_stops_saves_and_resumes_to_the_same_result(full4, tmp_path, monkeypatch):
    """A run whose deadline allows only one more meta-step after the first stops at 2 of 4 with everything saved;
    --resume then ends where the uninterrupted 4-step run ends."""
    folder = str(tmp_path / "run")
    calls = []
    monkeypatch.setattr(tl.Deadline, "allows", lambda self, seconds: calls.append(seconds) or len(calls) < 3)
    stopped = meta_train(tiny_args(meta_steps=4, save_every=10, time_limit=1e6), TASKS, folder)
    # Before each meta-step: then the first one's time less its compilation is the estimate of the next.
    assert stopped.meta_step == 2 and len(calls) == 3 and calls[1] > 0
    assert read_optimizer_checkpoint(os.path.join(folder, "optimizer.msgpack"))["meta_step"] == 2
    assert saved_train_state(folder)[0] == 2  # saved at the stop although --save-every is 10
    monkeypatch.undo()
    resumed = meta_train(tiny_args(meta_steps=4, save_every=10, resume=True), TASKS, folder)
    assert resumed.meta_step == 4
    leaves_equal(resumed.lopt_params, full4.result.lopt_params, atol=1e-6)
    leaves_equal(saved_train_state(folder)[1], saved_train_state(full4.folder)[1], atol=1e-6)


def test_paper_job_is_a_wall_and_leaves_small_files(tmp_path):
    """benchmarks/paper_job.sh (its budget is --time-limit) with the tiny config and no end of meta-steps in sight:
    the job, evaluation included, ends within its budget (the test's clock adds the imports and slack for a loaded
    machine). OUT_DIR holds the optimizers, evaluation, metrics, plot and log, each small, the train state stays in
    WORK_DIR, and a second job with the same WORK_DIR resumes it. Where the evaluation did not fit, the job says so
    and how to run it instead."""
    out, work, budget = tmp_path / "out", tmp_path / "work", 30
    settings = {**TINY, "val_every": 10**6, "reset_interval": 64, "meta_lr": 3e-3, "meta_steps": 10**6,
                "save_every": 10**6, "log_every": 10**6}
    flags = cli_flags(settings)
    cache = jax.config.jax_compilation_cache_dir  # conftest's: the tiny programs may be compiled there already
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHON=sys.executable, WORK_DIR=str(work),
               JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
    job = lambda *extra: subprocess.run(["bash", "benchmarks/paper_job.sh", str(budget), str(out), *flags, *extra],  # noqa: E731
                                        cwd=REPO, env=env, text=True, capture_output=True, timeout=300)
    start = time.time()
    proc = job()
    wall = time.time() - start
    log = (out / "job.log").read_text()
    assert proc.returncode == 0 and "Traceback" not in log, proc.stderr[-2000:]
    assert wall <= budget + 20, f"{wall:.0f}s for a {budget}s budget:\n{log[-3000:]}"
    expected = {"optimizer.msgpack", "optimizer_best.msgpack", "metrics.csv", "meta_training.png", "args.json",
                "job.log"}
    done = saved_train_state(str(work / "run"))[0]  # the train state stays out of OUT_DIR
    assert read_optimizer_checkpoint(str(out / "optimizer.msgpack"))["meta_step"] == done
    if "skipped the final evaluation" in log:
        assert "--eval-only --lopt-path" in log
    else:
        expected.add("eval.json")
        assert f"stopped after meta-step {done} of {10**6}" in log and "evaluation took" in log, log[-3000:]
        assert json.load(open(out / "eval.json"))["lopt_path"] == "optimizer_best.msgpack"
    assert set(os.listdir(out)) == expected
    assert all(os.path.getsize(out / name) < 200_000 for name in expected)

    proc = job("--meta-steps", str(done + 1), "--no-final-eval")
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = (out / "job.log").read_text()
    assert "resumed" in log and f"meta-step {done + 1}/{done + 1} | ? env steps/s" in log and "nan" not in log
    assert read_optimizer_checkpoint(str(out / "optimizer.msgpack"))["meta_step"] == done + 1


def test_validation_never_keeps_a_nan_score(tmp_path, monkeypatch):
    """An optimizer whose validation agents diverge scores NaN; it is never the best, and does not block a later one."""
    scripted_validation(monkeypatch, {0: float("nan"), 2: -0.3})
    result = meta_train(tiny_args(val_every=2), TASKS, str(tmp_path / "run"))
    assert (result.best_step, result.best_score) == (2, -0.3)
    assert read_optimizer_checkpoint(str(tmp_path / "run" / "optimizer_best.msgpack"))["meta_step"] == 2


# ------------------------------------------------------------------------------------------------
# 17. The evaluation protocol: learning-rate tuning, baseline cache, IQM and stratified bootstrap intervals
# ------------------------------------------------------------------------------------------------


def test_normalised_scores_use_tuned_adam_and_random():
    returns = {"adam": np.array([3.0, 5.0]), "random": np.array([1.0, 1.0]), "lopt": np.array([1.0, 2.5, 5.5])}
    np.testing.assert_allclose(tl.normalized_scores(returns, "lopt"), [0.0, 0.5, 1.5], atol=1e-6)
    assert np.mean(tl.normalized_scores(returns, "adam")) == pytest.approx(1.0)


def test_tune_learning_rate_extends_the_grid_at_an_edge():
    """A return that peaks beyond the grid's top makes the grid grow there, at most MAX_GRID_EXTENSIONS times; an
    interior optimum is kept without extension; a diverged lr (no finished episode) is never picked."""
    asked = []

    def peaked_at(optimum):
        def returns_for(lrs):
            asked.extend(lrs)
            return {lr: np.full(4, -abs(math.log(lr / optimum))) for lr in lrs}
        return returns_for

    best, results = tl.tune_learning_rate(peaked_at(3e-3), tl.LR_GRID)
    assert best == 3e-3 and sorted(results) == sorted(tl.LR_GRID) and len(asked) == len(tl.LR_GRID)
    best, results = tl.tune_learning_rate(peaked_at(1e-1), tl.LR_GRID)
    assert best == 0.09 and sorted(results)[-1] == 0.27  # 3e-2 x 3 was the edge, so 0.27 was tried: worse
    best, results = tl.tune_learning_rate(peaked_at(10.0), tl.LR_GRID)
    assert best == 0.27 and len(results) == len(tl.LR_GRID) + tl.MAX_GRID_EXTENSIONS  # stops at the cap
    best, _ = tl.tune_learning_rate(peaked_at(1e-6), tl.LR_GRID)
    assert best == pytest.approx(1.11e-5)
    diverged = lambda lrs: {lr: np.array([np.nan, 5.0]) if lr == 1e-2 else np.ones(2) * lr for lr in lrs}  # noqa: E731
    assert tl.tune_learning_rate(diverged, (1e-3, 1e-2, 3e-3))[0] == 3e-3


def test_baseline_cache_trains_each_learning_rate_once(tmp_path, monkeypatch):
    """A second request for the same (task, budget, seeds) reads the file; new learning rates train only
    themselves; another budget or stream is another file, of per-seed returns."""
    args = tiny_args()
    trained = []

    def fake_returns(self, kind, keys, lrs, lopt_params=None):
        trained.append((kind, self.steps, tuple(float(lr) for lr in lrs)))
        return np.array([[lr, 2 * lr] for lr in lrs], float)

    monkeypatch.setattr(tl.TaskEvaluator, "returns", fake_returns)
    cache = tl.BaselineCache(str(tmp_path))
    evaluator = tl.TaskEvaluator(args, "catch", lopt_config(args), 64)
    first = cache.returns(evaluator, "adam", tl.VAL_STREAM, 2, [1e-3, 3e-3])
    again = tl.BaselineCache(str(tmp_path)).returns(evaluator, "adam", tl.VAL_STREAM, 2, [3e-3, 1e-3, 1e-2])
    assert trained == [("adam", 64, (1e-3, 3e-3)), ("adam", 64, (1e-2,))]
    np.testing.assert_array_equal(again[3e-3], first[3e-3])
    np.testing.assert_array_equal(again[1e-2], [1e-2, 2e-2])
    cache.returns(tl.TaskEvaluator(args, "catch", lopt_config(args), 128), "adam", tl.VAL_STREAM, 2, [1e-3])
    cache.returns(evaluator, "adam", tl.EVAL_STREAM, 2, [1e-3])
    assert len(trained) == 4 and len(os.listdir(tmp_path)) == 3  # another budget, another stream: new entries
    stored = json.load(open(tmp_path / sorted(os.listdir(tmp_path))[0]))
    assert set(stored) == {"adam"} and all(len(v) == 2 for v in stored["adam"].values())


# ------------------------------------------------------------------------------------------------
# --meta-grad pes: persistent evolution strategies
# ------------------------------------------------------------------------------------------------


def quadratic_unroll(theta, x0, a, truncations: int, steps: int):
    """A toy unrolled problem: gradient descent on f(x) = sum(a x^2) / 2 with per-coordinate step sizes theta;
    each truncation's loss is f after its `steps` steps. Returns the list of truncation losses."""
    losses, x = [], x0
    for _ in range(truncations):
        for _ in range(steps):
            x = x - theta * a * x
        losses.append(0.5 * jnp.sum(a * x**2))
    return losses, x


def test_pes_is_unbiased_for_the_whole_unroll_where_truncation_is_not():
    """On the toy unroll, the gradient of the summed truncation losses is known (autodiff end to end). PES over
    many antithetic pairs matches it within 4 standard errors; the truncated gradient (each truncation
    differentiated from a constant start, as --meta-grad truncated does) is off by more than 10 of them."""
    a, x0, theta = jnp.array([1.0, 3.0]), jnp.array([1.0, -1.0]), jnp.array([0.3, 0.1])
    truncations, steps, particles, sigma = 3, 2, 2**16, 1e-3
    whole = jax.grad(lambda t: sum(quadratic_unroll(t, x0, a, truncations, steps)[0]))(theta)

    truncated, x = jnp.zeros(2), x0
    for _ in range(truncations):
        truncated += jax.grad(lambda t, x=x: quadratic_unroll(t, x, a, 1, steps)[0][0])(theta)
        x = quadratic_unroll(theta, x, a, 1, steps)[1]

    @jax.jit
    def pes_contributions(key):
        """Per pair, the sum over truncations of its two particles' PES terms (the estimate is their mean)."""
        states, accumulators = jnp.tile(x0, (particles, 1)), jnp.zeros((particles, 2))
        reset_now, total = jnp.ones(particles, bool), jnp.zeros((particles, 2))
        for t, k in enumerate(jax.random.split(key, truncations)):
            def unroll(perturbed, states=states):
                losses, new_states = jax.vmap(lambda p, s: quadratic_unroll(p, s, a, 1, steps))(perturbed, states)
                return losses[0], new_states

            _, accumulators, losses, states = tl.pes_step(theta, accumulators, reset_now, k, sigma, unroll)
            total += accumulators * losses[:, None] / sigma**2
            reset_now = jnp.zeros(particles, bool)
        return total.reshape(particles // 2, 2, 2).mean(1)

    per_pair = np.asarray(pes_contributions(jax.random.PRNGKey(0)), np.float64)
    estimate, stderr = per_pair.mean(0), per_pair.std(0) / np.sqrt(len(per_pair))
    assert np.all(np.abs(estimate - np.asarray(whole)) < 4 * stderr), (estimate, whole, stderr)
    assert np.linalg.norm(np.asarray(truncated) - np.asarray(whole)) > 10 * np.linalg.norm(stderr), (truncated, whole)


def test_antithetic_es_recovers_a_quadratics_gradient():
    """With every particle reset, pes_step is antithetic ES: on L = theta' A theta / 2 + b' theta it returns
    C grad L exactly, C the perturbations' sample covariance / sigma^2 (pairs cancel every even-order term), which
    is grad L within a few percent at this many pairs; the pairs are +eps and -eps."""
    rng = np.random.default_rng(0)
    dim, particles, sigma = 5, 2**14, 0.1
    m = rng.normal(size=(dim, dim))
    A, b, theta = jnp.asarray(m @ m.T / dim, jnp.float32), jnp.asarray(rng.normal(size=dim), jnp.float32), \
        jnp.asarray(rng.normal(size=dim), jnp.float32)
    loss = lambda t: 0.5 * t @ A @ t + b @ t  # noqa: E731
    key = jax.random.PRNGKey(1)
    grad, accumulators, _, _ = tl.pes_step(theta, jnp.ones((particles, dim)), jnp.ones(particles, bool), key, sigma,
                                           lambda p: (jax.vmap(loss)(p), None))
    eps = tl.antithetic_perturbations(key, particles, dim, sigma)
    np.testing.assert_array_equal(accumulators, eps)  # reset: the accumulators restart from this perturbation
    np.testing.assert_array_equal(eps[0::2], -eps[1::2])
    true = A @ theta + b
    np.testing.assert_allclose(grad, (eps.T @ eps) @ true / (particles * sigma**2), rtol=2e-3, atol=2e-3)
    assert float(jnp.linalg.norm(grad - true) / jnp.linalg.norm(true)) < 0.05


def test_pes_meta_training_pairs_its_agents_trains_and_resumes_to_the_same_state(tmp_path):
    """--meta-grad pes: the agents of a pair start identical; 2 meta-steps and a resume to 4 end where 4 in one
    go do (the accumulators included); the optimizer moved; an odd population is a one-line error."""
    with pytest.raises(UserError, match="--num-agents 3: --meta-grad pes needs an even number"):
        tl.make_meta_train(tiny_args(meta_grad="pes", num_agents=3), TASKS)
    mt = tl.make_meta_train(tiny_args(meta_grad="pes"), TASKS)
    state = mt.init(jax.random.PRNGKey(0))
    leaves_equal(jax.tree.map(lambda x: x[0], state.populations[0]), jax.tree.map(lambda x: x[1], state.populations[0]))
    assert state.pes_accumulators[0].shape == (2, ravel_pytree(state.lopt_params)[0].size)
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    whole = meta_train(tiny_args(meta_grad="pes", meta_steps=4), TASKS, full)
    meta_train(tiny_args(meta_grad="pes", meta_steps=2), TASKS, part)
    with pytest.raises(UserError, match="meta_grad"):  # the estimator is part of the run: it may not change
        meta_train(tiny_args(meta_steps=4, resume=True), TASKS, part)
    resumed = meta_train(tiny_args(meta_grad="pes", meta_steps=4, resume=True), TASKS, part)
    leaves_equal(resumed.lopt_params, whole.lopt_params, atol=1e-6)
    leaves_equal(saved_train_state(part)[1], saved_train_state(full)[1], atol=1e-6)
    assert tree_finite(whole.lopt_params)
    moved = [float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(whole.lopt_params), jax.tree.leaves(whole.init_params))]
    assert max(moved) > 1e-4
