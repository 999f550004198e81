"""OPEN (Goldie et al., NeurIPS 2024), the field's published learned optimizer for RL, as an optax transform.

Written here from the paper and from reading its code (AlexGoldie/rl-learned-optimization); its meta-trained
weights are data, committed in checkpoints/open/ with their licence. Per parameter, OPEN feeds one GRU (8 units)
and an MLP (16-16, LayerNorm, ReLU) with 19 features:
- normalised per tensor (each feature divided by its RMS over the tensor's coordinates): the parameter value,
  sign and log|.| of six momenta (decays 0.1 ... 0.9999), sign g and log|g|;
- given as they are: the fraction of training done, the epoch's position within a PPO update ("batch
  proportion"), the layer's depth in its network (0 = input layer, 1 = output layer), and the output neuron's
  dormancy (its mean |activation| over the batch divided by the layer's average: 1 = typical, 0 = dead).
Its three outputs give the step `lr * (o1 exp(1e-3 o2) + o3 * noise)`, noise ~ N(0, 1) only where noise_mask is
set (OPEN: the actor), and then the mean step over all parameters is subtracted. OPEN's lr is fixed at 1e-3;
here it is the learning_rate, tuned like every baseline's.

    tx = open_optimizer(num_updates=1000)                 # a drop-in optax transform
    updates, state = tx.update(grads, state, params)      # + neuron_activity=... for the dormancy feature
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from common import UserError

OPEN_WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints", "open",
                            "gridworld_OPEN.npy")
MOMENTUM_DECAYS = (0.1, 0.5, 0.9, 0.99, 0.999, 0.9999)
LOG_EPS = 1e-13  # inside log(|x| + eps), as OPEN
NORMALIZER_EPS = 1e-5
EXP_MULT = 1e-3  # the magnitude output's scale inside exp(), fixed by OPEN's meta-training
DEFAULT_LR = 1e-3  # OPEN's step_mult
GRU_UNITS, MLP_UNITS, NUM_FEATURES = 8, 16, 19


class OpenNet(nn.Module):
    """Per coordinate: GRU over the 19 features, then MLP -> (magnitude, log-scale, noise scale)."""

    @nn.compact
    def __call__(self, carry, features):
        carry, hidden = nn.GRUCell(GRU_UNITS, name="gru")(carry, features)
        x = hidden
        for i in range(2):
            x = nn.relu(nn.LayerNorm(name=f"norm_{i}")(nn.Dense(MLP_UNITS, name=f"dense_{i}")(x)))
        return carry, nn.Dense(3, name="out")(x)


def _unflatten_weights(flat: np.ndarray) -> dict:
    """OPEN's weights are one vector: jax.flatten_util.ravel_pytree of {"gru_params": GRUCell params,
    "params": Sequential(Dense, LayerNorm, relu, Dense, LayerNorm, relu, Dense) params} (keys in sorted order).
    Rebuilt here from that layout, then renamed into OpenNet's tree."""
    gru = nn.GRUCell(GRU_UNITS).init(jax.random.PRNGKey(0), jnp.zeros(GRU_UNITS), jnp.zeros(NUM_FEATURES))
    mlp = nn.Sequential([nn.Dense(MLP_UNITS), nn.LayerNorm(), nn.relu, nn.Dense(MLP_UNITS), nn.LayerNorm(), nn.relu,
                         nn.Dense(3)]).init(jax.random.PRNGKey(0), jnp.zeros(GRU_UNITS))
    template, unravel = ravel_pytree({"gru_params": gru, "params": mlp})
    if flat.shape != template.shape:
        raise UserError(f"OPEN weights: expected {template.size} floats (the small OPEN network), got {flat.size}")
    tree = unravel(jnp.asarray(flat, jnp.float32))
    layers = tree["params"]["params"]
    return {"params": {"gru": tree["gru_params"]["params"], "dense_0": layers["layers_0"],
                       "norm_0": layers["layers_1"], "dense_1": layers["layers_3"], "norm_1": layers["layers_4"],
                       "out": layers["layers_6"]}}


def load_open_weights(path: str = OPEN_WEIGHTS) -> dict:
    """OPEN's published weights (a .npy of one float vector) as OpenNet parameters."""
    try:
        flat = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise UserError(f"OPEN weights: cannot read {path} ({error}); expected a .npy of "
                        f"OPEN's released weights, e.g. gridworld_OPEN.npy") from None
    return _unflatten_weights(np.asarray(flat).reshape(-1))


class OpenState(NamedTuple):
    momenta: Any  # per parameter leaf, shape + (6,)
    carry: Any  # per parameter leaf, shape + (8,)
    count: jax.Array  # optimizer steps taken
    key: jax.Array  # for the noise


def _normalize(x: jax.Array) -> jax.Array:
    """Each feature divided by its RMS over the tensor's coordinates (all axes but the last)."""
    axes = tuple(range(x.ndim - 1))
    return x * jax.lax.rsqrt(NORMALIZER_EPS + jnp.mean(jnp.square(x), axis=axes, keepdims=True))


def tensor_features(param, grad, momenta, training_progress, layer_proportion, batch_proportion, dormancy):
    """The 19 inputs of every coordinate of one tensor, [*shape, 19] (param, grad: [*shape]; momenta
    [*shape, 6]; dormancy broadcastable to shape; the other three scalars)."""

    def sign_log(x):
        return [jnp.sign(x), jnp.log(jnp.abs(x) + LOG_EPS)]

    scaled = jnp.concatenate([param[..., None], *sign_log(momenta), *(f[..., None] for f in sign_log(grad))], -1)
    constant = [jnp.broadcast_to(jnp.asarray(f, jnp.float32), param.shape)[..., None]
                for f in (training_progress, layer_proportion, batch_proportion, dormancy)]
    return jnp.concatenate([_normalize(scaled), *constant], -1)


def layer_proportions_by_module(params) -> Any:
    """Each leaf's layer depth as OPEN gives it: i / (n - 1) for the i-th of the n modules (the parents of the
    leaves) in the tree's order, counted within each top-level entry (each network) separately."""
    paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]

    def proportion(path):
        network = path[:1]
        modules = list(dict.fromkeys(p[:-1] for p in paths if p[:1] == network))
        return modules.index(path[:-1]) / max(len(modules) - 1, 1)

    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), [proportion(p) for p in paths])


def given(tree_or_function, params, default):
    """A per-leaf input given as a tree, as a function of params, or not at all (default(params))."""
    if tree_or_function is None:
        return default(params)
    return tree_or_function(params) if callable(tree_or_function) else tree_or_function


def mlp_neuron_activity(mlp_params, x: jax.Array, activation) -> Any:
    """OPEN's neuron_activity for a plain MLP ({"params": {"hidden_0": Dense, ...}} as brax.training.networks.MLP
    names its layers; activation after every layer but the last): per leaf, the layer's mean |output| over x's
    batch, recomputed from the parameters."""
    layers = mlp_params["params"]
    names = sorted(layers, key=lambda name: int(name.rsplit("_", 1)[1]))
    activity = {}
    for i, name in enumerate(names):
        x = x @ layers[name]["kernel"] + layers[name]["bias"]
        if i < len(names) - 1:
            x = activation(x)
        mean_abs = jnp.mean(jnp.abs(x), axis=tuple(range(x.ndim - 1)))
        activity[name] = {leaf: mean_abs for leaf in layers[name]}
    return {"params": activity}


def dormancy(activity: jax.Array) -> jax.Array:
    """A layer's per-neuron dormancy from its mean |activation| over a batch: activity / mean activity."""
    activity = activity + 1e-11
    return activity / jnp.sum(jnp.abs(activity), -1, keepdims=True) * activity.shape[-1]


def open_optimizer(num_updates: int, learning_rate: float = DEFAULT_LR, epochs: int = 1, minibatches: int = 1,
                   weights: dict | str | None = None, layer_proportions: Any = None, noise_mask: Any = None,
                   max_grad_norm: float | None = 0.5, seed: int = 0) -> optax.GradientTransformationExtraArgs:
    """OPEN as an optax transform.

    num_updates, epochs, minibatches: the training loop's shape, which OPEN's progress inputs need (a PPO run of
    num_updates rollouts, each followed by epochs x minibatches optimizer steps; A2C: epochs = minibatches = 1).
    layer_proportions: per leaf, the layer's depth in [0, 1], or a function of params giving them (default
    layer_proportions_by_module).
    noise_mask: per leaf, 1 where the learned noise is added (OPEN: the actor's parameters), or a function of params
    giving it; default: everywhere.
    max_grad_norm: the global-norm clip OPEN was meta-trained behind (0.5, per network: per top-level entry of
    the tree; None: no clip).
    update(grads, state, params, neuron_activity=None): neuron_activity, per leaf, the mean |activation| of the
    layer's output neurons (shape (out,) for a (in, out) kernel and its bias), or a function of no arguments
    returning it (a training loop can then pass it to any optimizer: only OPEN computes it); without it every
    neuron has dormancy 1.
    """
    if num_updates < 1 or epochs < 1 or minibatches < 1:
        raise UserError(f"open_optimizer: num_updates, epochs and minibatches must be >= 1, "
                        f"got {num_updates}, {epochs}, {minibatches}")
    theta = load_open_weights(weights or OPEN_WEIGHTS) if weights is None or isinstance(weights, str) else weights
    net = OpenNet()
    steps_per_update = epochs * minibatches

    def init(params):
        zeros = lambda extra: jax.tree.map(lambda p: jnp.zeros((*jnp.shape(p), extra), jnp.float32), params)
        return OpenState(zeros(len(MOMENTUM_DECAYS)), zeros(GRU_UNITS), jnp.zeros((), jnp.int32),
                         jax.random.PRNGKey(seed))

    def update(grads, state, params=None, neuron_activity=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError("open_optimizer needs params: its inputs include the parameter values")
        if max_grad_norm:  # each network (top-level entry) on its own, as OPEN clips its actor and critic
            networks, top = jax.tree_util.tree_flatten(grads, is_leaf=lambda node: node is not grads)
            clip = optax.clip_by_global_norm(max_grad_norm)
            grads = top.unflatten([clip.update(n, optax.EmptyState())[0] for n in networks])
        treedef = jax.tree_util.tree_structure(params)
        leaves = lambda tree: treedef.flatten_up_to(tree)
        # OPEN's progress inputs; a loop with one epoch (A2C) or one update has 0 where OPEN would divide by 0.
        training_progress = (state.count // steps_per_update) / max(num_updates - 1, 1)
        batch_proportion = ((state.count // minibatches) % epochs) / max(epochs - 1, 1)
        decays = jnp.asarray(MOMENTUM_DECAYS, jnp.float32)
        momenta = jax.tree.map(lambda m, g: decays * m + (1 - decays) * g[..., None], state.momenta, grads)
        depth = given(layer_proportions, params, layer_proportions_by_module)
        mask = given(noise_mask, params, lambda p: jax.tree.map(lambda _: 1.0, p))
        activity = neuron_activity() if callable(neuron_activity) else neuron_activity
        activity = [None] * treedef.num_leaves if activity is None else leaves(activity)
        key, noise_key = jax.random.split(state.key)
        noise_keys = jax.random.split(noise_key, treedef.num_leaves)
        steps, carries = [], []
        for p, g, m, c, d, n, a, k in zip(leaves(params), leaves(grads), leaves(momenta), leaves(state.carry),
                                         leaves(depth), leaves(mask), activity, noise_keys):
            p, g = jnp.atleast_1d(p), jnp.atleast_1d(g)
            m, c = m.reshape(*p.shape, -1), c.reshape(*p.shape, -1)
            features = tensor_features(p, g, m, training_progress, d, batch_proportion,
                                       1.0 if a is None else dormancy(a))
            carry, out = net.apply(theta, c, features)
            step = out[..., 0] * jnp.exp(EXP_MULT * out[..., 1]) + n * out[..., 2] * jax.random.normal(k, p.shape)
            steps.append(learning_rate * step)
            carries.append(carry)
        mean_step = jnp.mean(jnp.concatenate([s.ravel() for s in steps]))  # OPEN centres the whole step
        updates = [-(s - mean_step).reshape(jnp.shape(p)) for s, p in zip(steps, leaves(params))]
        carry = [c.reshape(*jnp.shape(p), GRU_UNITS) for c, p in zip(carries, leaves(params))]
        return (treedef.unflatten(updates),
                OpenState(momenta, treedef.unflatten(carry), state.count + 1, key))

    return optax.GradientTransformationExtraArgs(init, update)
