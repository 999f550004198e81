"""Meta-training speed and memory of train_lopt.py, against plain A2C + Adam on the same population.

    python benchmarks/bench_meta.py                                   # small grid, big grid, gridworld x 8/32/128
    python benchmarks/bench_meta.py --groups gridworld --populations 16 64   # the original's two anchors

Every (task group, population) runs in its own child process, so that its peak memory (peak RSS, compilation
included, as the original implementation was measured) is its own. In the child, after compilation, three
jitted functions are timed in alternation, `--repeats` times each, and their medians reported:
- the meta-step (K learned-optimizer updates + the meta-loss rollout, backward through the K updates, meta-update);
- plain training: the same population, environments and rollout, K + 1 A2C updates with Adam per call, i.e. the
  same number of environment steps as one meta-step. Ratio (a) = meta env steps/s / plain env steps/s;
- the learned optimizer alone: forward and backward through K steps over every agent's parameters, agents in
  chunks as in the meta-step, on random gradients. Ratio (b) = its time / the meta-step's time.
Because the three alternate in one process, the ratios hold on a noisy machine; absolute times do not.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_lopt as tl  # noqa: E402
from common import ENV_GROUPS, run_cli  # noqa: E402


@dataclass
class BenchArgs:
    groups: tuple[str, ...] = ("small_dense_long", "big_dense_long", "gridworld")
    """task groups (common.ENV_GROUPS), or 'every': train_lopt's --meta-tasks every (all eight grids and catch)"""
    populations: tuple[int, ...] = (8, 32, 128)
    """agents per task"""
    num_envs: int = 1
    """environment streams per agent (the paper and the original implementation use one)"""
    inner_updates: int = 4
    rollout_steps: int = 20
    agents_per_chunk: int | None = tl.Args.agents_per_chunk
    """train_lopt's --agents-per-chunk: meta-gradients of this many agents of a task at a time"""
    repeats: int = 3
    timeout: int = 1800
    """seconds per (group, population) child before it is reported as timed out"""
    out: str | None = None
    """also write the rows to this JSON file"""


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def timed(fn, *args):
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return time.perf_counter() - start, out


def measure(group: str, agents: int, bench: BenchArgs) -> dict:
    """One (group, population): runs in a child process."""
    args = dataclasses.replace(tl.Args(), num_agents=agents, num_envs=bench.num_envs,
                               inner_updates=bench.inner_updates, rollout_steps=bench.rollout_steps,
                               agents_per_chunk=bench.agents_per_chunk)
    every = group == "every"
    names = tl.meta_task_names(dataclasses.replace(args, meta_tasks="every"), ()) if every else ENV_GROUPS[group]
    mt = tl.make_meta_train(args, names)
    state = mt.init(jax.random.PRNGKey(0))
    start = time.perf_counter()
    state, _ = jax.block_until_ready(mt.meta_step(state))
    compile_s = time.perf_counter() - start
    state, _ = jax.block_until_ready(mt.meta_step(state))  # one more warm step before timing
    rss_after_meta = peak_rss_gib()

    # Plain training: the same population with Adam, K + 1 updates per call = a meta-step's env steps.
    adam = tl.with_grad_clip(optax.adam(3e-3), args.grad_clip)
    populations = tuple(jax.vmap(lambda k, t=task: tl.init_agent(t, adam, k))(jax.random.split(jax.random.PRNGKey(i), agents))
                        for i, task in enumerate(mt.tasks))

    @jax.jit
    def plain(populations):
        def train(task, population):
            step = lambda agent, _: tl.a2c_step(task, adam, agent)  # noqa: E731
            return jax.vmap(lambda a: jax.lax.scan(step, a, length=args.inner_updates + 1))(population)[0]
        return tuple(train(task, pop) for task, pop in zip(mt.tasks, populations))

    populations = jax.block_until_ready(plain(populations))

    # The learned optimizer alone, laid out as in the meta-step: per task, forward + backward through K steps on
    # every agent's parameters, agents vmapped in chunks of --agents-per-chunk, the chunks one after another.
    net, lopt_params = mt.net, jax.device_get(state.lopt_params)  # a copy: meta_step donates the state
    chunk = tl.agents_per_chunk(args)
    agent_sizes = [tl.ravel_pytree(jax.tree.map(lambda x: x[0], pop.params))[0].size for pop in populations]
    grads = [jax.random.normal(jax.random.PRNGKey(i), (agents // chunk, chunk, bench.inner_updates, size)) * 1e-3
             for i, size in enumerate(agent_sizes)]
    num_coords = agents * sum(agent_sizes)  # agents x parameters, all tasks

    def agent_lopt_loss(p, agent_grads):  # train_lopt's own (rematerialised) transformation, K steps
        tx = tl.learned_optimizer(net, p, 1.0, rematerialize=True)

        def step(state, g):
            updates, state = tx.update(g, state)
            return state, jnp.sum(updates)
        return jnp.sum(jax.lax.scan(step, tx.init(agent_grads[0]), agent_grads)[1])

    @jax.jit
    def lopt_fwd_bwd(lopt_params, grads):
        def chunk_grad(total, chunk_grads):
            grad = jax.grad(lambda p: jnp.sum(jax.vmap(agent_lopt_loss, (None, 0))(p, chunk_grads)))(lopt_params)
            return jax.tree.map(jnp.add, total, grad), None

        total = jax.tree.map(jnp.zeros_like, lopt_params)
        for task_grads in grads:
            total = jax.lax.scan(chunk_grad, total, task_grads)[0]
        return total

    jax.block_until_ready(lopt_fwd_bwd(lopt_params, grads))

    times = {"meta": [], "plain": [], "lopt": []}
    for _ in range(bench.repeats):
        dt, (state, _) = timed(mt.meta_step, state)
        times["meta"].append(dt)
        dt, populations = timed(plain, populations)
        times["plain"].append(dt)
        times["lopt"].append(timed(lopt_fwd_bwd, lopt_params, grads)[0])
    t = {k: float(np.median(v)) for k, v in times.items()}
    env_steps = tl.env_steps_per_meta_step(args) * len(names)
    return dict(group=group, agents=agents, devices=jax.device_count(), num_coords=int(num_coords),
                compile_s=compile_s, meta_s=t["meta"], meta_steps_per_s=1 / t["meta"],
                env_steps_per_s=env_steps / t["meta"], plain_env_steps_per_s=env_steps / t["plain"],
                ratio_a=t["plain"] / t["meta"], lopt_s=t["lopt"], ratio_b=t["lopt"] / t["meta"],
                peak_rss_gib=rss_after_meta, peak_rss_gib_all=peak_rss_gib())


def run_child(group: str, agents: int, bench: BenchArgs) -> dict:
    argv = [sys.executable, os.path.abspath(__file__), "--child", group, str(agents), json.dumps(dataclasses.asdict(bench))]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=bench.timeout)
    except subprocess.TimeoutExpired:
        return dict(group=group, agents=agents, error=f"timed out after {bench.timeout}s")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        why = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else (proc.stderr.strip().splitlines() or ["?"])[-1]
        return dict(group=group, agents=agents, error=f"exit {proc.returncode}: {why}")
    return json.loads(lines[-1])


# (key, header, width, format)
COLUMNS = [("group", "group", 17, "<"), ("agents", "agents", 7, ">"), ("compile_s", "compile s", 10, ">.0f"),
           ("meta_s", "s/meta-step", 12, ">.2f"), ("env_steps_per_s", "env steps/s", 12, ">,.0f"),
           ("plain_env_steps_per_s", "plain steps/s", 14, ">,.0f"), ("ratio_a", "(a)", 7, ">.3f"),
           ("ratio_b", "(b)", 6, ">.2f"), ("peak_rss_gib", "peak GiB", 9, ">.2f")]


def format_table(rows: list[dict]) -> str:
    lines = ["".join(f"{h:{'<' if i == 0 else '>'}{w}}" for i, (_, h, w, _) in enumerate(COLUMNS))]
    for row in rows:
        if "error" in row:
            lines.append(f"{row['group']:<17}{row['agents']:>6}  {row['error']}")
        else:
            lines.append("".join(f"{row[key]:{fmt[0]}{w}{fmt[1:]}}" for key, _, w, fmt in COLUMNS))
    return "\n".join(lines)


def format_growth(rows: list[dict]) -> str:
    """Per doubling of the population: how time per agent, env steps/s and peak memory change."""
    lines = ["per doubling of the population (factor, geometric mean between successive sizes):"]
    for group in dict.fromkeys(r["group"] for r in rows):
        ok = sorted((r for r in rows if r["group"] == group and "error" not in r), key=lambda r: r["agents"])
        for a, b in zip(ok, ok[1:]):
            doublings = np.log2(b["agents"] / a["agents"])
            f = lambda key: (b[key] / a[key]) ** (1 / doublings)  # noqa: E731
            per_agent = ((b["meta_s"] / b["agents"]) / (a["meta_s"] / a["agents"])) ** (1 / doublings)
            lines.append(f"  {group} {a['agents']}->{b['agents']}: time per agent x{per_agent:.2f}, "
                         f"env steps/s x{f('env_steps_per_s'):.2f}, peak memory x{f('peak_rss_gib'):.2f}")
    return "\n".join(lines)


def main(bench: BenchArgs) -> None:
    unknown = [g for g in bench.groups if g not in (*ENV_GROUPS, "every")]
    if unknown:
        raise tl.UserError(f"unknown group {unknown[0]!r}; choose from {', '.join(ENV_GROUPS)}, every")
    print(f"bench_meta: {jax.device_count()} device(s), num_envs {bench.num_envs}, K {bench.inner_updates}, "
          f"rollout {bench.rollout_steps}, {bench.agents_per_chunk} agents per chunk, "
          f"{bench.repeats} timed repeats per function", flush=True)
    rows = []
    for group in bench.groups:
        for agents in bench.populations:
            rows.append(run_child(group, agents, bench))
            print(format_table(rows[-1:]).splitlines()[-1], flush=True)
    print()
    print(format_table(rows))
    print("(a) = meta-training env steps/s / plain A2C+Adam env steps/s, same population and rollout")
    print("(b) = learned optimizer forward+backward through K steps / meta-step time")
    print(format_growth(rows))
    if bench.out:
        with open(bench.out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        row = measure(sys.argv[2], int(sys.argv[3]), BenchArgs(**json.loads(sys.argv[4])))
        print(json.dumps(row), flush=True)
    else:
        run_cli(lambda: main(tyro.cli(BenchArgs)))
