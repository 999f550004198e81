"""Tests for open_optimizer.py (OPEN as an optax transform): its update against updates recorded with OPEN's own
code and weights, the per-network clip, the layer depths, the neuron-activity inputs of our A2C and Brax networks,
and bad weight files."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization

from common import UserError
from open_optimizer import OPEN_WEIGHTS, layer_proportions_by_module, load_open_weights, mlp_neuron_activity, open_optimizer

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def load_record():
    with open(os.path.join(DATA, "open_update_gridworld.msgpack"), "rb") as f:
        return serialization.msgpack_restore(f.read())


def test_open_reproduces_updates_recorded_with_its_own_code():
    """Six updates of a small actor and critic, recorded by tests/make_open_fixture.py with OPEN's code and
    gridworld_OPEN.npy: same parameters after every update (noise on the actor, dormancy and progress inputs)."""
    record = load_record()
    params = record["initial_params"]
    mask = {"actor": jax.tree.map(lambda _: 1.0, params["actor"]), "critic": jax.tree.map(lambda _: 0.0, params["critic"])}
    # The recorded progress inputs: training (0, 0, 0.5, 0.5, 1, 1) and batch proportion (0, 1, 0, 1, 0, 1).
    tx = open_optimizer(num_updates=3, epochs=2, noise_mask=mask, max_grad_norm=None)
    update, state = jax.jit(tx.update), tx.init(params)
    for i in range(len(record["steps"])):
        step = record["steps"][str(i)]
        activity = {net: {"params": {layer: {"kernel": a, "bias": a} for layer, a in layers.items()}}
                    for net, layers in step["activations"].items()}
        updates, state = update(step["grads"], state, params, neuron_activity=activity)
        moved = max(float(np.abs(u).max()) for u in jax.tree.leaves(updates))
        params = jax.tree.map(lambda p, u: p + u, params, updates)
        error = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), params,
                                                 step["params_after"])))
        assert moved > 1e-4, f"update {i} barely moves the parameters ({moved})"
        assert error < 1e-6, f"update {i}: parameters differ from OPEN's by {error}"


def test_open_clips_each_network_on_its_own():
    """A critic gradient 10x larger (both above the clip's norm) changes nothing: the clip is per network, and
    the actor's gradient is not scaled down by the critic's norm."""
    record = load_record()
    params, grads = record["initial_params"], record["steps"]["0"]["grads"]
    tx = open_optimizer(num_updates=10)
    state = tx.init(params)
    base, _ = tx.update(grads, state, params)
    louder, _ = tx.update({"actor": grads["actor"], "critic": jax.tree.map(lambda g: 10 * g, grads["critic"])},
                          state, params)
    for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(louder)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9)
    unclipped, _ = open_optimizer(num_updates=10, max_grad_norm=None).update(grads, state, params)
    assert max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(unclipped))) > 1e-6


def test_layer_proportions_by_module_counts_within_each_network():
    layer = {"bias": np.zeros(2), "kernel": np.zeros((2, 2))}
    params = {"actor": {"params": {"Dense_0": layer, "Dense_1": layer, "Dense_2": layer, "log_std": np.zeros(2)}},
              "critic": {"params": {"Dense_0": layer, "Dense_1": layer}}}
    depth = layer_proportions_by_module(params)
    assert [depth["actor"]["params"][f"Dense_{i}"]["kernel"] for i in range(3)] == [0.0, 1 / 3, 2 / 3]
    assert depth["actor"]["params"]["log_std"] == 1.0
    assert depth["critic"]["params"]["Dense_0"]["bias"] == 0.0 and depth["critic"]["params"]["Dense_1"]["bias"] == 1.0


def test_mlp_neuron_activity_matches_brax_mlp():
    """Recomputed from the parameters, the same per-layer mean |activation| as Brax's MLP's own layers give."""
    from brax.training import networks

    mlp = networks.MLP(layer_sizes=[5, 4, 3], activation=jax.nn.silu)
    x = jax.random.normal(jax.random.PRNGKey(0), (7, 6))
    params = mlp.init(jax.random.PRNGKey(1), x)
    _, state = mlp.apply(params, x, capture_intermediates=True)
    activity = mlp_neuron_activity(params, x, jax.nn.silu)
    for i in range(3):
        out = state["intermediates"][f"hidden_{i}"]["__call__"][0]
        expected = jnp.mean(jnp.abs(jax.nn.silu(out) if i < 2 else out), 0)
        np.testing.assert_allclose(activity["params"][f"hidden_{i}"]["kernel"], expected, rtol=1e-5)


def test_a2c_network_gives_open_its_per_layer_inputs():
    import train_lopt as tl

    net = tl.ActorCritic("small", 9)
    obs = jax.random.uniform(jax.random.PRNGKey(0), (5, 6, 8, 3))
    params = net.init(jax.random.PRNGKey(1), obs)
    activity = net.neuron_activity(params, obs)["params"]
    layers = params["params"]
    hidden = jax.nn.relu(obs.reshape(5, -1) @ layers["Dense_0"]["kernel"] + layers["Dense_0"]["bias"])
    value = hidden @ layers["Dense_2"]["kernel"] + layers["Dense_2"]["bias"]
    np.testing.assert_allclose(activity["Dense_0"]["kernel"], jnp.mean(hidden, 0), rtol=1e-5)
    np.testing.assert_allclose(activity["Dense_2"]["bias"], jnp.mean(jnp.abs(value), 0), rtol=1e-5)
    depth, mask = tl.ActorCritic.layer_proportions(params)["params"], tl.ActorCritic.noise_mask(params)["params"]
    assert (depth["Dense_0"]["kernel"], depth["Dense_1"]["kernel"], depth["Dense_2"]["bias"]) == (0.0, 1.0, 1.0)
    assert (mask["Dense_0"]["bias"], mask["Dense_1"]["kernel"], mask["Dense_2"]["kernel"]) == (1.0, 1.0, 0.0)


def test_bad_weight_files_are_one_line_errors(tmp_path):
    assert load_open_weights(OPEN_WEIGHTS)["params"]["gru"]["ir"]["kernel"].shape == (19, 8)
    short = tmp_path / "short.npy"
    np.save(short, np.zeros(100, np.float32))
    with pytest.raises(UserError, match="expected 1211 floats"):
        load_open_weights(str(short))
    with pytest.raises(UserError, match="cannot read"):
        load_open_weights(str(tmp_path / "missing.npy"))
    with pytest.raises(UserError, match="num_updates"):
        open_optimizer(num_updates=0)
