"""Records OPEN's own update (its rl_optimizer/network.py with gridworld_OPEN.npy) on a small actor and critic:
tests/data/open_update_gridworld.msgpack, which tests/test_open_optimizer.py replays through open_optimizer.py.

Needs OPEN's code, which this project does not vendor. How the committed file was made (2026-12-06):
    OPEN=AlexGoldie/rl-learned-optimization at b65037b, its rl_optimizer/ folder in $REF/rl_optimizer, with
    google/learned_optimization (32186aa) in $REF/rl_optimizer/learned_optimization (its learned_optimization/
    __init__.py, tree_utils.py, learned_optimizers/{__init__,common}.py are all OPEN's network.py imports), and
    pip install --target $REF/site --no-deps gin-config chex==0.1.90 toolz
    REF=$REF python tests/make_open_fixture.py        # with this project's venv (jax 0.10.2, flax 0.12.8)
"""
import os
import sys

REF = os.environ.get("REF", "/tmp/openref")
sys.path[:0] = [f"{REF}/site", f"{REF}/rl_optimizer"]
import jax, jax.numpy as jnp, numpy as np
from flax import serialization
from network import GRU_Opt
from utils import ParameterReshaper

flat = jnp.asarray(np.load(f"{REF}/rl_optimizer/pretrained/gridworld_OPEN.npy", allow_pickle=True))
meta = GRU_Opt(hidden_size=16, gru_features=8)
theta = ParameterReshaper(meta.init(jax.random.PRNGKey(0)), verbose=False).reshape_single(flat)
opt = meta.opt_fn(theta)

rng = np.random.default_rng(0)
def dense(i, o): return {"kernel": jnp.asarray(rng.normal(0, 0.5, (i, o)), jnp.float32), "bias": jnp.asarray(rng.normal(0, 0.1, (o,)), jnp.float32)}
actor = {"params": {"Dense_0": dense(5, 16), "Dense_1": dense(16, 16), "Dense_2": dense(16, 4)}}
critic = {"params": {"Dense_0": dense(5, 16), "Dense_1": dense(16, 16), "Dense_2": dense(16, 1)}}
params = {"actor": actor, "critic": critic}
layer_props = {n: {"params": {f"Dense_{i}": {"kernel": i / 2, "bias": i / 2} for i in range(3)}} for n in ("actor", "critic")}
mask = {"actor": {"params": {f"Dense_{i}": {"kernel": 1, "bias": 1} for i in range(3)}},
        "critic": {"params": {f"Dense_{i}": {"kernel": 0, "bias": 0} for i in range(3)}}}
sa = opt.init(actor, key=jax.random.PRNGKey(1))
sc = opt.init(critic, key=jax.random.PRNGKey(2))

def grad_like(p):  # magnitudes over several decades, one exact zero per tensor
    g = rng.choice([-1, 1], p.shape) * 10.0 ** rng.uniform(-6, 0, p.shape)
    g.flat[0] = 0.0
    return jnp.asarray(g, jnp.float32)

steps = []
stream = jax.random.PRNGKey(0)  # open_optimizer(seed=0)'s key sequence
for t, (training_prop, batch_prop) in enumerate([(0.0, 0.0), (0.0, 1.0), (0.5, 0.0), (0.5, 1.0), (1.0, 0.0), (1.0, 1.0)]):
    grads = jax.tree_util.tree_map(grad_like, params)
    acts = {n: tuple({"kernel": a, "bias": a} for a in
                     [jnp.asarray(rng.uniform(0, 2, (o,)), jnp.float32) for o in (16, 16, 4 if n == "actor" else 1)])
            for n in ("actor", "critic")}
    stream, key = jax.random.split(stream)
    sa, sc, _, _ = opt.update(sa, sc, grads, acts, key=key, training_prop=jnp.float32(training_prop),
                              batch_prop=jnp.float32(batch_prop), layer_props=layer_props, mask=mask,
                              config={"VISUALISE": False})
    steps.append({"grads": grads, "activations": {n: {f"Dense_{i}": acts[n][i]["kernel"] for i in range(3)} for n in acts},
                  "training_prop": training_prop, "batch_prop": batch_prop, "key": np.asarray(key),
                  "params_after": {"actor": sa.params, "critic": sc.params}})
record = {"initial_params": params, "steps": {str(i): s for i, s in enumerate(steps)}}
record = jax.tree_util.tree_map(np.asarray, record)
open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "open_update_gridworld.msgpack"), "wb").write(serialization.msgpack_serialize(record))
d = jax.tree_util.tree_map(lambda a, b: float(np.abs(a - b).max()), steps[-1]["params_after"], params)
print("max |param change| per leaf after 6 updates:", d)
