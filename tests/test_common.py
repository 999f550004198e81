"""Tests for common.py: the LPG gridworlds (reset, moves, pickups, termination, respawn, time limit,
auto-reset), the checkpoint I/O (a full disk included) and the stop on SIGINT/SIGTERM."""

from __future__ import annotations

import errno
import functools
import math
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import (
    GRIDWORLDS,
    MOVES,
    GridParams,
    GridSpec,
    GridState,
    Gridworld,
    Interrupted,
    StopSignals,
    UserError,
    iqm,
    iqm_interval,
    load_arrays,
    load_msgpack,
    make_env,
    run_cli,
    save_arrays,
    save_msgpack,
)

N_KEYS = 2000
KEYS = jax.random.split(jax.random.PRNGKey(0), N_KEYS)

# A 7x7 map (5x5 interior) with a +1 and a -1 object; object properties come from the params.
SPEC2 = GridSpec(7, 7, ((1.0, 0.0, 0.0), (-1.0, 0.0, 0.0)), 5)
# A 4x5 map (2x3 interior: rows 1-2, columns 1-3) with three objects, for respawn tests.
SPEC3 = GridSpec(4, 5, ((1.0, 0.0, 0.0), (1.0, 0.0, 0.0), (1.0, 0.0, 0.0)), 50)


@functools.lru_cache(maxsize=None)
def fns(spec: GridSpec):
    """One env per spec with jitted (once) reset / step_env, single and vmapped over keys."""
    env = Gridworld(spec)
    return {
        "env": env,
        "step": jax.jit(env.step_env),
        "vstep": jax.jit(jax.vmap(env.step_env, in_axes=(0, None, None, None))),
        "vreset": jax.jit(jax.vmap(env.reset_env, in_axes=(0, None))),
        "obs": jax.jit(env.get_obs),
    }


def params(rewards, terminate, respawn, max_steps=50):
    return GridParams(
        rewards=jnp.asarray(rewards, jnp.float32),
        terminate_prob=jnp.asarray(terminate, jnp.float32),
        respawn_prob=jnp.asarray(respawn, jnp.float32),
        max_steps_in_episode=max_steps,
    )


def state(agent, objects, present, time=0):
    return GridState(
        agent=jnp.asarray(agent, jnp.int32),
        objects=jnp.asarray(objects, jnp.int32).reshape(-1, 2),
        present=jnp.asarray(present, bool),
        time=jnp.asarray(time, jnp.int32),
    )


def interior(spec, cell):
    r, c = int(cell[0]), int(cell[1])
    return 1 <= r <= spec.height - 2 and 1 <= c <= spec.width - 2


def pick(tree, i):
    """Element i of a batched pytree, as numpy."""
    return jax.tree.map(lambda x: np.asarray(x)[i], tree)


def check_obs(obs, st, k):
    """Each present object's plane has exactly one 1 at its cell, absent ones are empty, agent plane too."""
    obs, agent, objects, present = map(np.asarray, (obs, st.agent, st.objects, st.present))
    assert set(np.unique(obs)) <= {0.0, 1.0}
    for i in range(k):
        if present[i]:
            assert obs[..., i].sum() == 1 and obs[objects[i][0], objects[i][1], i] == 1
        else:
            assert obs[..., i].sum() == 0
    assert obs[..., k].sum() == 1 and obs[agent[0], agent[1], k] == 1


# ---------------------------------------------------------------------------------------------
# 1. reset and make_env
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(GRIDWORLDS))
def test_reset_layout_and_obs(name):
    """Reset puts agent and objects on distinct interior cells, all present, obs matches the state."""
    env, p = make_env(name)
    spec, k = GRIDWORLDS[name], len(GRIDWORLDS[name].objects)
    assert env.num_objects == k and env.num_actions == 9
    assert env.observation_space(p).shape == (spec.height, spec.width, k + 1)
    np.testing.assert_allclose(p.rewards, [o[0] for o in spec.objects])
    np.testing.assert_allclose(p.terminate_prob, [o[1] for o in spec.objects])
    np.testing.assert_allclose(p.respawn_prob, [o[2] for o in spec.objects])
    assert int(p.max_steps_in_episode) == spec.max_steps

    obs, st = fns(spec)["vreset"](KEYS[:64], p)
    assert obs.shape == (64, spec.height, spec.width, k + 1) and obs.dtype == jnp.float32
    assert np.all(np.asarray(st.present)) and np.all(np.asarray(st.time) == 0)
    agents, objects = np.asarray(st.agent), np.asarray(st.objects)
    for b in range(64):
        cells = [tuple(agents[b])] + [tuple(o) for o in objects[b]]
        assert len(set(cells)) == k + 1, cells
        assert all(interior(spec, c) for c in cells), cells
        check_obs(obs[b], pick(st, b), k)
    assert len({tuple(a) for a in agents}) > 1  # reset is random


def test_make_env_catch_and_unknown():
    """'catch' gives gymnax Catch; an unknown name raises ValueError listing valid names."""
    env, p = make_env("catch")
    obs, st = env.reset(jax.random.PRNGKey(0), p)
    assert obs.size > 0
    obs2, *_ = env.step(jax.random.PRNGKey(1), st, 0, p)
    assert obs2.shape == obs.shape
    with pytest.raises(ValueError) as info:
        make_env("nope")
    msg = str(info.value)
    assert "nope" in msg and "catch" in msg and all(n in msg for n in GRIDWORLDS)


# ---------------------------------------------------------------------------------------------
# 2. moves and walls
# ---------------------------------------------------------------------------------------------

P_STILL = params([1.0, -1.0], [0.0, 0.0], [0.0, 0.0])  # nothing terminates or respawns


def test_move_into_wall_stays_move_away_moves():
    """Next to the top wall, moves north stay in place; a move south goes one row down."""
    f = fns(SPEC2)
    st = state([1, 3], [[5, 5], [5, 1]], [True, True])
    key = jax.random.PRNGKey(3)
    for action in (1, 2, 8):  # N, NE, NW
        _, new, *_ = f["step"](key, st, action, P_STILL)
        np.testing.assert_array_equal(new.agent, [1, 3])
    for action in (3, 4, 5, 6, 7):  # E, SE, S, SW, W
        _, new, *_ = f["step"](key, st, action, P_STILL)
        np.testing.assert_array_equal(new.agent, np.array([1, 3]) + MOVES[action])
    # Corner (5, 5): bottom-right; only N, W, NW are possible.
    st = state([5, 5], [[1, 1], [1, 2]], [True, True])
    for action in range(9):
        _, new, *_ = f["step"](key, st, action, P_STILL)
        expected = [5, 5] if action in (2, 3, 4, 5, 6) else np.array([5, 5]) + MOVES[action]
        np.testing.assert_array_equal(new.agent, expected, err_msg=f"action {action}")


def test_all_moves_from_center():
    """From the center cell each of the 9 actions moves by MOVES[action]; the agent plane follows."""
    f = fns(SPEC2)
    st = state([3, 3], [[1, 1], [1, 5]], [True, True])
    for action in range(9):
        obs, new, reward, done, _ = f["step"](jax.random.PRNGKey(0), st, action, P_STILL)
        np.testing.assert_array_equal(new.agent, np.array([3, 3]) + MOVES[action])
        assert float(reward) == 0.0 and not bool(done) and int(new.time) == 1
        check_obs(obs, new, 2)


def test_moves_everywhere_match_wall_rule():
    """For every interior cell and action: the agent goes to the target if it is interior, else stays."""
    f = fns(SPEC2)
    base = state([0, 0], [[1, 1], [1, 2]], [False, False])
    for r in range(1, 6):
        for c in range(1, 6):
            agent = np.array([r, c], np.int32)
            for action in range(9):
                got = f["step"](jax.random.PRNGKey(0), base.replace(agent=agent), action, P_STILL)[1].agent
                target = agent + MOVES[action]
                expected = target if interior(SPEC2, target) else agent
                np.testing.assert_array_equal(got, expected, err_msg=f"agent {agent} action {action}")


# ---------------------------------------------------------------------------------------------
# 3. pickup
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("action,reward,gone", [(1, 1.0, 0), (5, -1.0, 1)])
def test_pickup_reward_and_disappear(action, reward, gone):
    """Stepping onto a present object yields its reward and removes it (its obs plane is empty)."""
    f = fns(SPEC2)
    st = state([3, 3], [[2, 3], [4, 3]], [True, True])  # +1 north, -1 south of the agent
    obs, new, r, done, _ = f["step"](jax.random.PRNGKey(1), st, action, P_STILL)
    assert float(r) == reward and not bool(done)
    present = np.array([True, True])
    present[gone] = False
    np.testing.assert_array_equal(new.present, present)
    assert float(obs[..., gone].sum()) == 0.0
    assert float(obs[..., 1 - gone].sum()) == 1.0
    check_obs(obs, new, 2)


def test_pickup_uses_param_rewards_and_ignores_absent():
    """The reward comes from params; moving onto an absent object's old cell gives nothing."""
    f = fns(SPEC2)
    p = params([2.5, -0.75], [0.0, 0.0], [0.0, 0.0])
    st = state([3, 3], [[2, 3], [4, 3]], [True, True])
    assert float(f["step"](jax.random.PRNGKey(1), st, 1, p)[2]) == 2.5
    assert float(f["step"](jax.random.PRNGKey(1), st, 5, p)[2]) == -0.75
    assert float(f["step"](jax.random.PRNGKey(1), st, 0, p)[2]) == 0.0  # stay: nothing collected
    absent = state([3, 3], [[2, 3], [4, 3]], [False, True])
    _, new, r, done, _ = f["step"](jax.random.PRNGKey(1), absent, 1, p)
    assert float(r) == 0.0 and not bool(done)
    np.testing.assert_array_equal(new.present, [False, True])


# ---------------------------------------------------------------------------------------------
# 4. termination probability
# ---------------------------------------------------------------------------------------------

PICKUP = state([3, 3], [[2, 3], [4, 3]], [True, True])  # action 1 collects object 0, action 5 object 1


@pytest.mark.parametrize("prob,lo,hi", [(1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (0.5, 0.45, 0.55)])
def test_termination_probability(prob, lo, hi):
    """Picking up an object ends the episode with its terminate probability."""
    f = fns(SPEC2)
    p = params([1.0, -1.0], [prob, 0.0], [0.0, 0.0])
    _, new, r, done, _ = f["vstep"](KEYS, PICKUP, 1, p)
    assert np.all(np.asarray(r) == 1.0) and not np.any(np.asarray(new.present[:, 0]))
    rate = float(np.mean(np.asarray(done)))
    assert lo <= rate <= hi, rate


def test_no_termination_without_pickup():
    """Terminate prob 1 only matters when the object is collected."""
    f = fns(SPEC2)
    p = params([1.0, -1.0], [1.0, 1.0], [0.0, 0.0])
    _, _, r, done, _ = f["vstep"](KEYS, PICKUP, 3, p)  # move east: nothing there
    assert not np.any(np.asarray(done)) and np.all(np.asarray(r) == 0.0)
    # Collecting object 1 uses object 1's probability, not object 0's.
    p = params([1.0, -1.0], [1.0, 0.0], [0.0, 0.0])
    _, _, r, done, _ = f["vstep"](KEYS, PICKUP, 5, p)
    assert not np.any(np.asarray(done)) and np.all(np.asarray(r) == -1.0)


# ---------------------------------------------------------------------------------------------
# 5. respawn probability (4x5 map: 6 interior cells)
# ---------------------------------------------------------------------------------------------

# Agent at (1,1), objects 1 and 2 present at (2,2) and (1,3): free cells are (1,2), (2,1), (2,3).
RESPAWN_STATE = state([1, 1], [[1, 1], [2, 2], [1, 3]], [False, True, True])
FREE = {(1, 2), (2, 1), (2, 3)}


def test_respawn_prob_one_lands_on_free_cell():
    """With respawn prob 1 an absent object is back next step on a free interior cell, ~uniformly."""
    f = fns(SPEC3)
    p = params([1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0])
    obs, new, r, done, _ = f["vstep"](KEYS, RESPAWN_STATE, 0, p)  # agent stays
    assert np.all(np.asarray(new.present))
    assert np.all(np.asarray(r) == 0.0) and not np.any(np.asarray(done))
    objects = np.asarray(new.objects)
    np.testing.assert_array_equal(objects[:, 1:], np.broadcast_to([[2, 2], [1, 3]], (N_KEYS, 2, 2)))
    cells = [tuple(c) for c in objects[:, 0]]
    assert set(cells) == FREE, set(cells)
    for cell in FREE:
        assert 0.25 < cells.count(cell) / N_KEYS < 0.42, (cell, cells.count(cell))
    for b in range(0, N_KEYS, 97):
        check_obs(obs[b], pick(new, b), 3)


@pytest.mark.parametrize("prob,lo,hi", [(0.0, 0.0, 0.0), (0.5, 0.45, 0.55)])
def test_respawn_probability_rate(prob, lo, hi):
    """An absent object comes back with its respawn probability."""
    f = fns(SPEC3)
    p = params([1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [prob, 1.0, 1.0])  # present objects ignore respawn
    obs, new, *_ = f["vstep"](KEYS, RESPAWN_STATE, 0, p)
    back = np.asarray(new.present[:, 0])
    assert lo <= back.mean() <= hi, back.mean()
    assert np.all(np.asarray(obs[:, :, :, 0]).sum(axis=(1, 2)) == back)
    np.testing.assert_array_equal(new.present[:, 1:], np.ones((N_KEYS, 2), bool))


def test_two_respawns_never_collide():
    """Two objects respawning in the same step land on different cells."""
    f = fns(SPEC3)
    p = params([1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 1.0, 0.0])
    st = state([1, 1], [[1, 1], [1, 1], [2, 3]], [False, False, True])  # 4 free cells
    _, new, *_ = f["vstep"](KEYS, st, 0, p)
    objects = np.asarray(new.objects)
    assert np.all(np.asarray(new.present))
    assert not np.any(np.all(objects[:, 0] == objects[:, 1], axis=-1))
    for k in (0, 1):
        cells = {tuple(c) for c in objects[:, k]}
        assert cells == {(1, 2), (1, 3), (2, 1), (2, 2)}, cells


def test_respawn_happens_before_move_and_pickup():
    """An object respawning on the agent's target cell is collected in that same step."""
    f = fns(SPEC3)
    p = params([3.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0])
    _, new, r, *_ = f["vstep"](KEYS, RESPAWN_STATE, 3, p)  # agent moves east to (1,2), a free cell
    np.testing.assert_array_equal(new.agent, np.broadcast_to([1, 2], (N_KEYS, 2)))
    on_target = np.all(np.asarray(new.objects[:, 0]) == [1, 2], axis=-1)
    assert 0.25 < on_target.mean() < 0.42
    np.testing.assert_array_equal(np.asarray(r), np.where(on_target, 3.0, 0.0))
    np.testing.assert_array_equal(np.asarray(new.present[:, 0]), ~on_target)


# ---------------------------------------------------------------------------------------------
# 6/7. the gymnax wrapper: time limit and auto-reset
# ---------------------------------------------------------------------------------------------


N_ROLLOUT = 12


@jax.jit
def rollout(key, st, actions, p):
    """N_ROLLOUT steps through gymnax's env.step (with auto-reset), stacked outputs."""
    env = fns(SPEC2)["env"]

    def body(st, xs):
        key, action = xs
        obs, st, r, term, trunc, info = env.step(key, st, action, p)
        return st, (obs, st, r, term, trunc, info["final_observation"])

    return jax.lax.scan(body, st, (jax.random.split(key, N_ROLLOUT), actions))[1]


STAY = jnp.zeros(N_ROLLOUT, jnp.int32)


def test_time_limit_truncates_and_resets():
    """With max_steps=5, truncation happens at steps 5 and 10 exactly and yields a fresh reset state."""
    f = fns(SPEC2)
    p = params([1.0, -1.0], [0.0, 0.0], [0.0, 0.0], max_steps=5)
    st = state([3, 3], [[1, 1], [1, 5]], [False, False])  # both absent, never respawn
    obs, sts, r, term, trunc, final = rollout(jax.random.PRNGKey(7), st, STAY, p)
    np.testing.assert_array_equal(trunc, [i in (4, 9) for i in range(N_ROLLOUT)])
    assert not np.any(np.asarray(term)) and np.all(np.asarray(r) == 0.0)
    np.testing.assert_array_equal(sts.time, [1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1, 2])
    present = np.asarray(sts.present)
    assert not np.any(present[:4]) and np.all(present[4:])  # the reset made objects present
    for i in range(N_ROLLOUT):
        np.testing.assert_array_equal(obs[i], f["obs"](pick(sts, i)))
    # The final observation of step 5 is the pre-reset one: agent still at (3,3), no objects.
    assert float(final[4][..., :2].sum()) == 0.0 and float(final[4][3, 3, 2]) == 1.0


def test_auto_reset_after_termination():
    """A terminating pickup through env.step returns a fresh reset state; info has the final obs."""
    f = fns(SPEC2)
    north_then_stay = STAY.at[0].set(1)
    start = PICKUP.replace(time=jnp.int32(3))
    p = params([1.0, -1.0], [1.0, 0.0], [0.0, 0.0])
    obs, sts, r, term, trunc, final = map(lambda x: pick(x, 0), rollout(jax.random.PRNGKey(2), start, north_then_stay, p))
    assert bool(term) and not bool(trunc) and float(r) == 1.0
    assert int(sts.time) == 0 and np.all(sts.present)
    np.testing.assert_array_equal(obs, f["obs"](sts))
    assert final[..., 0].sum() == 0 and final[2, 3, 2] == 1 and final[4, 3, 1] == 1
    assert not np.array_equal(final, obs)
    # Without termination nothing is reset and the final observation is the returned one.
    p0 = params([1.0, -1.0], [0.0, 0.0], [0.0, 0.0])
    obs, sts, r, term, trunc, final = map(lambda x: pick(x, 0), rollout(jax.random.PRNGKey(2), start, north_then_stay, p0))
    assert not bool(term) and float(r) == 1.0 and int(sts.time) == 4
    np.testing.assert_array_equal(sts.present, [False, True])
    np.testing.assert_array_equal(obs, final)


# ---------------------------------------------------------------------------------------------
# 8. checkpoints
# ---------------------------------------------------------------------------------------------


def test_msgpack_round_trip_atomic(tmp_path):
    """A nested dict with arrays and a string survives save/load; no temp files are left behind."""
    tree = {
        "params": {"w": jnp.arange(6, dtype=jnp.float32).reshape(2, 3), "b": jnp.array([1, -2], jnp.int32)},
        "meta": {"name": "small_dense_short", "step": 7},
    }
    path = tmp_path / "sub" / "ckpt.msgpack"
    save_msgpack(str(path), tree)
    save_msgpack(str(path), tree)  # overwriting works too
    assert os.listdir(tmp_path / "sub") == ["ckpt.msgpack"]
    back = load_msgpack(str(path))
    assert set(back) == {"params", "meta"}
    np.testing.assert_array_equal(back["params"]["w"], np.arange(6, dtype=np.float32).reshape(2, 3))
    assert np.asarray(back["params"]["w"]).dtype == np.float32
    np.testing.assert_array_equal(back["params"]["b"], [1, -2])
    assert back["meta"]["name"] == "small_dense_short" and back["meta"]["step"] == 7


def test_arrays_round_trip_atomic_and_corrupt(tmp_path):
    """save_arrays/load_arrays keep the header, order, shapes (0-d included) and dtypes; a truncated or foreign
    file is a UserError naming it; no temporary file is left behind."""
    arrays = [np.arange(6, dtype=np.float32).reshape(2, 3), np.array(7, np.int32), np.array([True, False]),
              np.asfortranarray(np.ones((3, 2), np.uint32))]
    path = tmp_path / "state.npy"
    save_arrays(str(path), {"meta_step": 3, "settings": {"a": 1}}, arrays)
    header, back = load_arrays(str(path))
    assert header == {"meta_step": 3, "settings": {"a": 1}} and os.listdir(tmp_path) == ["state.npy"]
    assert [(a.shape, a.dtype) for a in back] == [(a.shape, a.dtype) for a in arrays]
    for a, b in zip(arrays, back):
        np.testing.assert_array_equal(a, b)
    data = path.read_bytes()
    (tmp_path / "truncated.npy").write_bytes(data[: len(data) - 5])
    (tmp_path / "foreign.npy").write_bytes(b"not numpy at all")
    for name in ("truncated.npy", "foreign.npy", "missing.npy"):
        with pytest.raises(UserError, match=name):
            load_arrays(str(tmp_path / name))


def test_load_missing_raises_user_error(tmp_path):
    """A missing checkpoint is a UserError naming the path."""
    path = str(tmp_path / "nothing.msgpack")
    with pytest.raises(UserError, match="nothing.msgpack") as info:
        load_msgpack(path)
    assert path in str(info.value)


@pytest.mark.parametrize("kind", ["random", "truncated", "empty"])
def test_load_corrupt_raises_user_error(tmp_path, kind):
    """Random bytes, a truncated checkpoint or an empty file give a UserError naming the file."""
    path = tmp_path / "bad.msgpack"
    if kind == "random":
        path.write_bytes(np.random.default_rng(0).bytes(256))
    else:
        save_msgpack(str(path), {"w": jnp.ones((8, 8)), "name": "x"})
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2] if kind == "truncated" else b"")
    with pytest.raises(UserError) as info:
        load_msgpack(str(path))
    assert str(path) in str(info.value)


# Statistics


def test_iqm_is_the_mean_of_the_middle_half():
    assert iqm(np.arange(1.0, 9.0)) == pytest.approx(4.5)  # drops 1, 2 and 7, 8
    assert iqm(np.array([0.0, 1.0, 1.0, 100.0])) == pytest.approx(1.0)  # an outlier does not move it


def test_stratified_bootstrap_keeps_each_tasks_runs():
    """Task A scores 0 on every seed, task B 1: a bootstrap that resamples within each task always draws half zeros
    and half ones, so the interval collapses to 0.5; pooled resampling would not. Noisy scores give an interval
    around the IQM that narrows with more seeds."""
    assert iqm_interval([np.zeros(8), np.ones(8)]) == (0.5, 0.5, 0.5)
    rng = np.random.default_rng(0)
    few, many = (iqm_interval([rng.normal(1.0, 1.0, n)]) for n in (16, 256))
    assert few[1] < few[0] < few[2] and many[1] < many[0] < many[2]
    assert many[2] - many[1] < 0.5 * (few[2] - few[1])
    assert iqm_interval([np.array([np.nan, 1.0, 1.0])]) == (1.0, 1.0, 1.0)  # non-finite runs are dropped
    assert all(math.isnan(x) for x in iqm_interval([np.array([np.nan])]))


class FullDisk:
    """A file opened by os.fdopen that takes `room` bytes and then fails each write with ENOSPC, as a full disk
    does."""

    def __init__(self, fd, mode="rb", room=16):
        self.file, self.room = open(fd, mode), room

    def write(self, data):
        data = bytes(data)
        taken = data[: self.room]
        self.file.write(taken)
        self.room -= len(taken)
        if len(taken) < len(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return len(data)

    def __getattr__(self, name):  # flush, fileno, close
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


@pytest.mark.parametrize("saver", ["msgpack", "arrays"])
def test_full_disk_is_a_user_error_and_keeps_the_old_file(tmp_path, monkeypatch, capsys, saver):
    """A write that runs out of space: a UserError naming the file and the cause (through run_cli: one stderr
    line, exit status 2); the file written before is unchanged and no temporary file is left."""
    path = str(tmp_path / ("ckpt.msgpack" if saver == "msgpack" else "state.npy"))
    save = {"msgpack": lambda: save_msgpack(path, {"w": np.arange(100.0)}),
            "arrays": lambda: save_arrays(path, {"meta_step": 1}, [np.arange(100.0)])}[saver]
    save()
    before = open(path, "rb").read()
    monkeypatch.setattr(os, "fdopen", FullDisk)
    with pytest.raises(UserError) as info:
        save()
    assert str(info.value) == f"cannot write {path}: No space left on device"
    with pytest.raises(SystemExit) as exit_info:
        run_cli(save)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"error: cannot write {path}: No space left on device\n"
    monkeypatch.undo()
    assert open(path, "rb").read() == before and os.listdir(tmp_path) == [os.path.basename(path)]


def test_stop_signals_take_the_first_signal_and_restore_the_handlers():
    """The first SIGTERM only sets `signum`; the handler that was there before is back at once (it takes the second)
    and stays after the block; an Interrupted exits through run_cli with 128 + the signal's number."""
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)  # a pytest-xdist worker ignores SIGINT
    try:
        with StopSignals() as stop:  # Ctrl-C: the same as SIGTERM
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.signum == signal.SIGINT and stop.name == "SIGINT"
        with StopSignals() as stop:
            assert stop.signum is None and signal.getsignal(signal.SIGINT) == stop._handle
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop.signum == signal.SIGTERM and stop.name == "SIGTERM" and seen == []
            assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
            os.kill(os.getpid(), signal.SIGTERM)
            assert seen == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler and seen == [signal.SIGTERM]
        with StopSignals(enabled=False) as stop:
            assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)

    def interrupted():
        raise Interrupted("interrupted by SIGTERM", signal.SIGTERM)

    with pytest.raises(SystemExit) as info:
        run_cli(interrupted)
    assert info.value.code == 143


def test_recorded_paths_are_relative_to_the_repository():
    """What result and checkpoint files record: paths inside the repository relative to it, others by name alone,
    in strings, command lines (`--flag=/path` too) and nested settings; relative paths and other values as given."""
    from common import REPOSITORY, recorded

    inside = os.path.join(REPOSITORY, "checkpoints", "optim4rl_gridworld.msgpack")
    assert recorded(inside) == os.path.join("checkpoints", "optim4rl_gridworld.msgpack")
    assert recorded("/tmp/bare/gridworld_optim4rl_s0/optimizer_best.msgpack") == "optimizer_best.msgpack"
    assert recorded("python train_lopt.py --out-dir /tmp/w/brax --lopt-path=/x/y/o.msgpack --seed 0") == \
        "python train_lopt.py --out-dir brax --lopt-path=o.msgpack --seed 0"
    assert recorded({"out_dir": "runs", "lopt_path": inside, "seeds": [1, 2], "lr": 3e-4, "none": None}) == \
        {"out_dir": "runs", "lopt_path": os.path.join("checkpoints", "optim4rl_gridworld.msgpack"), "seeds": [1, 2],
         "lr": 3e-4, "none": None}
    assert recorded("1e5 / 1e6") == "1e5 / 1e6"
