"""Thin shared code: the LPG gridworlds as gymnax environments, task groups, checkpoint I/O, errors.

The gridworlds follow Oh et al. (2020), "Discovering Reinforcement Learning Algorithms": walls around
an empty interior, 9 actions (stay + 8 compass moves), objects with (reward, termination probability,
respawn probability), binary observation planes laid out channels-last (H, W, num_objects + 1) so
that flax's `nn.Conv` convolves over the spatial axes.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import tempfile
import threading
from dataclasses import dataclass
from typing import Any

import gymnax
import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats
from flax import serialization, struct
from gymnax.environments import environment, spaces

# The optimizer that ships with the repository: Optim4RL meta-trained on the gridworld group (README).
PRETRAINED_OPTIMIZER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints",
                                    "optim4rl_gridworld.msgpack")

# ----------------------------------------------------------------------------------------------
# Gridworlds
# ----------------------------------------------------------------------------------------------

# Row/column offsets of the 9 actions: stay, N, NE, E, SE, S, SW, W, NW.
MOVES = np.array([[0, 0], [-1, 0], [-1, 1], [0, 1], [1, 1], [1, 0], [1, -1], [0, -1], [-1, -1]], np.int32)


@dataclass(frozen=True)
class GridSpec:
    height: int  # walls included
    width: int
    objects: tuple[tuple[float, float, float], ...]  # (reward, terminate prob, respawn prob)
    max_steps: int


_SPARSE = ((1.0, 0.0, 0.05), (-1.0, 0.5, 0.05))
_DENSE = ((1.0, 0.0, 0.5), (-1.0, 0.5, 0.5))
GRIDWORLDS: dict[str, GridSpec] = {
    "small_sparse_short": GridSpec(5, 10, _SPARSE, 50),
    "small_sparse_long": GridSpec(10, 5, _SPARSE, 500),
    "small_dense_short": GridSpec(6, 8, _DENSE, 50),
    "small_dense_long": GridSpec(8, 6, _DENSE, 500),
    "big_sparse_short": GridSpec(12, 14, _SPARSE * 2, 50),
    "big_sparse_long": GridSpec(14, 12, _SPARSE * 2, 500),
    "big_dense_short": GridSpec(11, 15, _DENSE * 2, 50),
    "big_dense_long": GridSpec(15, 11, _DENSE * 2, 500),
}
# `_SPARSE * 2` repeats the pair: (+1, -1, +1, -1); the order of objects does not matter.

# The paper's reward scaling for each task during meta-training: spreads agent gradients over several scales.
REWARD_SCALES = {
    "small_dense_long": 1e3,
    "small_dense_short": 1e2,
    "big_sparse_short": 1e2,
    "big_dense_short": 1e1,
    "big_sparse_long": 1e1,
    "big_dense_long": 1e0,
}
ENV_GROUPS: dict[str, tuple[str, ...]] = {"gridworld": tuple(REWARD_SCALES)}
ENV_GROUPS.update({name: (name,) for name in [*GRIDWORLDS, "catch"]})


@struct.dataclass(kw_only=True)
class GridState(environment.EnvState):
    agent: jax.Array  # (2,) row, column
    objects: jax.Array  # (K, 2) row, column of each object
    present: jax.Array  # (K,) bool: object is on the map
    time: jax.Array


@struct.dataclass(kw_only=True)
class GridParams(environment.EnvParams):
    rewards: jax.Array  # (K,)
    terminate_prob: jax.Array  # (K,)
    respawn_prob: jax.Array  # (K,)
    max_steps_in_episode: int = 50


class Gridworld(environment.Environment[GridState, GridParams]):
    """An LPG gridworld. The map layout (size, number of objects) is static; object properties are params."""

    def __init__(self, spec: GridSpec):
        super().__init__()
        self.spec = spec
        self.num_objects = len(spec.objects)
        interior = [(r, c) for r in range(1, spec.height - 1) for c in range(1, spec.width - 1)]
        self._interior = jnp.asarray(interior, jnp.int32)  # (num_interior, 2)
        self._interior_mask = jnp.zeros((spec.height, spec.width), bool).at[1:-1, 1:-1].set(True)

    @property
    def default_params(self) -> GridParams:
        objects = np.asarray(self.spec.objects, np.float32)
        return GridParams(
            rewards=jnp.asarray(objects[:, 0]),
            terminate_prob=jnp.asarray(objects[:, 1]),
            respawn_prob=jnp.asarray(objects[:, 2]),
            max_steps_in_episode=self.spec.max_steps,
        )

    def reset_env(self, key: jax.Array, params: GridParams) -> tuple[jax.Array, GridState]:
        # The agent and every object start on distinct random interior cells.
        free = self._interior_mask
        positions = []
        for cell_key in jax.random.split(key, self.num_objects + 1):  # <= 5 draws, unrolled
            positions.append(self._sample_cell(cell_key, free))
            free = free.at[positions[-1][0], positions[-1][1]].set(False)
        state = GridState(
            agent=positions[0],
            objects=jnp.stack(positions[1:]),
            present=jnp.ones(self.num_objects, bool),
            time=jnp.zeros((), jnp.int32),
        )
        return self.get_obs(state), state

    def step_env(self, key, state: GridState, action, params: GridParams):
        key_respawn, key_cell, key_terminate = jax.random.split(key, 3)
        # 1. Each missing object reappears with its respawn probability on a random empty cell.
        respawn = ~state.present & (jax.random.uniform(key_respawn, (self.num_objects,)) < params.respawn_prob)
        objects, present = state.objects, state.present
        for k, cell_key in enumerate(jax.random.split(key_cell, self.num_objects)):  # K <= 4, unrolled
            free = self._interior_mask.at[state.agent[0], state.agent[1]].set(False)
            free = free.at[objects[:, 0], objects[:, 1]].min(~present)
            cell = self._sample_cell(cell_key, free)
            objects = objects.at[k].set(jnp.where(respawn[k], cell, objects[k]))
            present = present.at[k].set(present[k] | respawn[k])
        # 2. Move; a move into a wall leaves the agent in place.
        target = state.agent + jnp.asarray(MOVES)[action]
        agent = jnp.where(self._interior_mask[target[0], target[1]], target, state.agent)
        # 3. Collect what lies under the agent: reward, possible termination, the object disappears.
        collected = present & jnp.all(objects == agent, axis=-1)
        reward = jnp.sum(jnp.where(collected, params.rewards, 0.0))
        ends = collected & (jax.random.uniform(key_terminate, (self.num_objects,)) < params.terminate_prob)
        state = GridState(agent=agent, objects=objects, present=present & ~collected, time=state.time + 1)
        return self.get_obs(state), state, reward, jnp.any(ends), {}

    def _sample_cell(self, key, free: jax.Array) -> jax.Array:
        """A uniformly random cell among the True entries of `free` (H, W), as (row, column).

        One uniform number per draw (random bits dominate the cost of stepping on CPU): pick the
        k-th free cell, k uniform in [0, number of free cells).
        """
        counts = jnp.cumsum(free.ravel())
        k = jnp.floor(jax.random.uniform(key) * counts[-1])
        flat = jnp.argmax(counts > k)
        return jnp.stack([flat // self.spec.width, flat % self.spec.width]).astype(jnp.int32)

    def get_obs(self, state: GridState, params=None, key=None) -> jax.Array:
        h, w, k = self.spec.height, self.spec.width, self.num_objects
        planes = jnp.zeros((h, w, k + 1), jnp.float32)
        planes = planes.at[state.objects[:, 0], state.objects[:, 1], jnp.arange(k)].max(
            state.present.astype(jnp.float32)
        )
        return planes.at[state.agent[0], state.agent[1], k].set(1.0)

    def is_terminated(self, state: GridState, params: GridParams) -> jax.Array:
        return jnp.array(False)  # termination is decided stochastically inside step_env

    @property
    def name(self) -> str:
        return "Gridworld"

    @property
    def num_actions(self) -> int:
        return len(MOVES)

    def action_space(self, params=None) -> spaces.Discrete:
        return spaces.Discrete(len(MOVES))

    def observation_space(self, params=None) -> spaces.Box:
        return spaces.Box(0.0, 1.0, (self.spec.height, self.spec.width, self.num_objects + 1), jnp.float32)


def make_env(name: str) -> tuple[environment.Environment, Any]:
    """A gridworld by name, or gymnax's bsuite Catch (`catch`)."""
    if name == "catch":
        return gymnax.make("Catch-bsuite")
    if name not in GRIDWORLDS:
        raise ValueError(f"unknown environment {name!r}; choose from {', '.join([*GRIDWORLDS, 'catch'])}")
    env = Gridworld(GRIDWORLDS[name])
    return env, env.default_params


def agent_kind(name: str) -> str:
    """Which of the paper's agent networks a task uses: 'small' MLP, 'big' conv net, or 'catch' MLP."""
    return "catch" if name == "catch" else name.split("_")[0]


# ----------------------------------------------------------------------------------------------
# Errors and checkpoints
# ----------------------------------------------------------------------------------------------


class UserError(Exception):
    """A problem with the user's input, or one the user can fix (a full disk), reported as one line without a
    traceback."""

    exit_code = 2


class Interrupted(UserError):
    """A run stopped by SIGINT or SIGTERM after saving its work; it exits as the shell reports a signal: 128 + its
    number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


def run_cli(main, *args, **kwargs):
    """Run `main`, turning a UserError into a one-line message and its exit status (2 unless it says otherwise);
    a KeyboardInterrupt (a second Ctrl-C, or one outside meta-training's loop) is a one-line message too."""
    try:
        return main(*args, **kwargs)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(error.exit_code) from None
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        raise SystemExit(128 + signal.SIGINT) from None


class StopSignals:
    """`with StopSignals() as stop:` turns the first SIGINT or SIGTERM into `stop.signum`, for a loop to check where
    it can save and stop; the handlers that were there before come back at once, so a second signal acts as it
    would have (Ctrl-C: KeyboardInterrupt; SIGTERM: termination), and for good on leaving the block.

    Python runs signal handlers in the main thread only: elsewhere, or with enabled=False, nothing is installed
    and `signum` stays None.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def _handle(self, signum, frame) -> None:
        self.signum = signum
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}

    def __enter__(self) -> "StopSignals":
        if self.enabled:
            self.previous = {signum: signal.getsignal(signum) for signum in self.SIGNALS}
            for signum in self.SIGNALS:
                signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()


def format_duration(seconds: float) -> str:
    """A duration for a log line: seconds under a minute, else minutes to a tenth."""
    return f"{seconds / 60:.1f}m" if seconds >= 60 else f"{seconds:.0f}s"


def flag_name(field: str) -> str:
    """The command-line flag of an Args field, as tyro spells it."""
    return "--" + field.replace("_", "-")


def check_args(args: Any, positive: tuple[str, ...] = (), non_negative: tuple[str, ...] = (),
               unit_interval: tuple[str, ...] = ()) -> None:
    """Each named Args field must be finite and > 0 (positive), >= 0 (non_negative) or in [0, 1] (unit_interval);
    None is left alone. `seed`, where Args has one, must fit the 32 bits that jax.random.PRNGKey keeps.

    Called before anything compiles, so a careless value costs nothing; NaN and inf fail every test.
    """
    for names, allowed, ok in ((positive, "a finite number > 0", lambda v: v > 0),
                               (non_negative, "a finite number >= 0", lambda v: v >= 0),
                               (unit_interval, "in [0, 1]", lambda v: 0 <= v <= 1)):
        for name in names:
            value = getattr(args, name)
            if value is not None and not (math.isfinite(value) and ok(value)):
                raise UserError(f"{flag_name(name)} {value}: must be {allowed}")
    seed = getattr(args, "seed", 0)
    if not 0 <= seed < 2**32:
        raise UserError(f"--seed {seed}: must be an integer in [0, {2**32 - 1}]")


def check_choices(flag: str, values, choices) -> None:
    """Each of `values` must be one of `choices`: otherwise a one-line error naming the valid ones."""
    for value in values:
        if value not in choices:
            raise UserError(f"{flag} {value}: unknown; choose from {', '.join(choices)}")


def check_writable_dir(path: str, flag: str = "--out-dir") -> None:
    """Create `path` if needed and make sure a file can be written there, before any work is done."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as error:
        raise UserError(f"{flag} {path}: cannot write there ({error.strerror or error})") from None


def atomic_write(path: str, write: Any) -> None:
    """Call write(file) on a temporary file in the same folder, fsync, then rename over `path`: a reader (or a
    resumed run) sees the old file or the new one, never half of one. A failed write (a full disk, say) is a
    UserError naming `path` and the cause; the old file stays as it was and the temporary one is removed."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as error:
        raise UserError(f"cannot write {path}: {error.strerror or error}") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            try:
                os.remove(tmp)
            except OSError:
                pass  # the error that brought us here is the one worth reporting


REPOSITORY = os.path.dirname(os.path.abspath(__file__))


def recorded(value: Any) -> Any:
    """`value` as a result or checkpoint file records it: every absolute path in it (a string, or the strings of
    a dict, list or command line) becomes relative to the repository when inside it, else its file name alone.
    Committed evidence then names files of the repository, never the machine or the scratch folder it came from."""
    if isinstance(value, dict):
        return {k: recorded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [recorded(v) for v in value]
    if not isinstance(value, str) or "/" not in value:
        return value
    if " " in value:  # a command line: token by token, `--flag=/path` included
        return " ".join(recorded(token) for token in value.split(" "))
    if "=" in value and value.startswith("-"):
        flag, path = value.split("=", 1)
        return f"{flag}={recorded(path)}"
    if not os.path.isabs(value):
        return value
    if os.path.commonpath([value, REPOSITORY]) == REPOSITORY:
        return os.path.relpath(value, REPOSITORY)
    return os.path.basename(value.rstrip("/")) or value


def save_msgpack(path: str, tree: Any) -> None:
    """Write a pytree of arrays/dicts atomically with flax's msgpack serialisation."""
    data = serialization.msgpack_serialize(serialization.to_state_dict(jax.device_get(tree)))
    atomic_write(path, lambda f: f.write(data))


def save_arrays(path: str, header: dict, arrays: list[np.ndarray]) -> None:
    """Atomically write a JSON header and then the arrays, back to back in numpy's .npy format.

    For large states: no serialisation step and no compression, so a save costs little more than the bytes
    written, far less CPU than flax's msgpack (benchmarks/bench_checkpoint.py).
    """

    def write(f):
        np.lib.format.write_array(f, np.array(json.dumps(header)), allow_pickle=False)
        for array in arrays:
            np.lib.format.write_array(f, array, allow_pickle=False)

    atomic_write(path, write)


def load_arrays(path: str) -> tuple[dict, list[np.ndarray]]:
    """(header, arrays) written by save_arrays; a missing or unreadable file is a UserError."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    arrays = []
    try:
        with open(path, "rb") as f:
            header = json.loads(str(np.lib.format.read_array(f, allow_pickle=False)))
            while f.peek(1):  # another array follows
                arrays.append(np.lib.format.read_array(f, allow_pickle=False))
    except Exception as error:  # numpy and json raise several unrelated types on corrupt input
        raise UserError(f"cannot read checkpoint {path}: corrupt or not written by this project "
                        f"({type(error).__name__})") from None
    if not isinstance(header, dict):
        raise UserError(f"cannot read checkpoint {path}: not written by this project")
    return header, arrays


def load_msgpack(path: str) -> dict:
    """Read a msgpack checkpoint as a nested dict; a missing or unreadable file is a UserError."""
    if os.path.isdir(path):
        raise UserError(f"checkpoint {path} is a directory; give the checkpoint file inside it")
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    try:
        with open(path, "rb") as f:
            tree = serialization.msgpack_restore(f.read())
    except Exception as error:  # msgpack raises several unrelated types on corrupt input
        raise UserError(f"cannot read checkpoint {path}: corrupt or not a msgpack file ({type(error).__name__})")
    if not isinstance(tree, dict):
        raise UserError(f"cannot read checkpoint {path}: not a checkpoint written by this project")
    return tree


# ----------------------------------------------------------------------------------------------
# Statistics: the interquartile mean and its stratified-bootstrap interval, as rliable computes them
# ----------------------------------------------------------------------------------------------
# Our own few lines rather than rliable: it would bring pandas, seaborn and arch for two functions.

BOOTSTRAP_SAMPLES = 10_000


def iqm(scores: np.ndarray, axis=None) -> np.ndarray:
    """Interquartile mean: the mean of the middle 50% of runs (scipy's trim_mean, as rliable uses)."""
    return scipy.stats.trim_mean(scores, 0.25, axis=axis)


def iqm_interval(per_task: list[np.ndarray], samples: int = BOOTSTRAP_SAMPLES, seed: int = 0):
    """(IQM, 2.5th, 97.5th percentile) of the IQM over all runs of all tasks; the interval comes from a stratified
    bootstrap, each task's runs resampled with replacement (percentile method). Non-finite runs are dropped."""
    per_task = [np.asarray(x, float)[np.isfinite(x)] for x in per_task]
    per_task = [x for x in per_task if x.size]
    if not per_task:
        return (math.nan, math.nan, math.nan)
    rng = np.random.default_rng(seed)
    resampled = np.concatenate([x[rng.integers(0, x.size, (samples, x.size))] for x in per_task], axis=1)
    low, high = np.percentile(iqm(resampled, axis=1), [2.5, 97.5])
    return (float(iqm(np.concatenate(per_task))), float(low), float(high))


# Learning-rate tuning, shared by train_lopt.py (gridworlds) and eval_brax.py (Brax): the best lr on selection seeds.
MAX_GRID_EXTENSIONS = 2  # per side


def selection_score(returns: np.ndarray) -> float:
    """Mean final return over the selection seeds; agents that produced no finished episode count as -inf."""
    return float(np.mean(returns)) if np.all(np.isfinite(returns)) else -math.inf


def round_lr(lr: float) -> float:
    return float(f"{lr:.3g}")  # 9e-3, not 0.009000000000000001: learning rates are keys of the cache and the report


def tune_learning_rate(returns_for, grid) -> tuple[float, dict]:
    """(best lr, {lr: per-seed returns}) by mean return on the selection seeds; returns_for(lrs) -> {lr: returns}.

    Where the best is at an edge of the grid, the grid is extended on that side by its own ratio (at most
    MAX_GRID_EXTENSIONS times), so the optimum is bracketed rather than clipped.
    """
    grid = sorted(float(lr) for lr in grid)
    results, extended = returns_for(grid), {"up": 0, "down": 0}
    while True:
        lrs = sorted(results)
        best = max(lrs, key=lambda lr: selection_score(results[lr]))
        side = "up" if best == lrs[-1] else "down" if best == lrs[0] else None
        if side is None or extended[side] == MAX_GRID_EXTENSIONS:
            return best, results
        extended[side] += 1
        results.update(returns_for([round_lr(best * (grid[-1] / grid[-2] if side == "up" else grid[0] / grid[1]))]))
