"""Does a vmapped, jitted training loop with orthogonally initialised networks and the learned optimizer hang?

A user reported a deadlock on 2 CPU cores with jaxlib 0.10.2: all threads waiting on a futex inside
lapack_sgeqrf_ffi, the QR factorisation behind `nn.initializers.orthogonal()`, batched by vmap. This script
runs that pattern in fresh processes, each under a timeout, and counts the ones that do not finish:

    python benchmarks/qr_hang_repro.py --runs 10 --timeout 60
    XLA_FLAGS=--xla_cpu_multi_thread_eigen=false python benchmarks/qr_hang_repro.py --runs 10

One process: init a PPO-like actor-critic (orthogonal kernels, --width hidden units) for --seeds seeds under
vmap, with the shipped learned optimizer's state, then --steps optimizer steps on a random batch; all of it
jitted, called --repeats times (fresh keys each call). A run that outlives --timeout is killed and counted as
hung. Wider kernels and more seeds make the batched QR larger (try --seeds 16 --width 256).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child(args) -> None:
    sys.path.insert(0, REPO)
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import optax

    from train_lopt import load_optimizer

    class ActorCritic(nn.Module):
        @nn.compact
        def __call__(self, x):
            dense = lambda n, scale: nn.Dense(n, kernel_init=nn.initializers.orthogonal(scale))  # noqa: E731
            h = nn.tanh(dense(args.width, 2**0.5)(x))
            h = nn.tanh(dense(args.width, 2**0.5)(h))
            return dense(4, 0.01)(h), dense(1, 1.0)(h)[..., 0]

    net = ActorCritic()
    tx = load_optimizer(os.path.join(REPO, "checkpoints", "optim4rl_gridworld.msgpack"))

    def train(key):
        init_key, data_key = jax.random.split(key)
        obs = jax.random.normal(data_key, (32, 8))
        params = net.init(init_key, obs)  # orthogonal init: a QR per kernel, batched by the vmap below
        state = tx.init(params)

        def loss(p):
            logits, value = net.apply(p, obs)
            return jnp.mean(value**2) - jnp.mean(jax.nn.log_softmax(logits)[:, 0])

        def step(carry, _):
            p, s = carry
            updates, s = tx.update(jax.grad(loss)(p), s, p)
            return (optax.apply_updates(p, updates), s), loss(p)

        _, losses = jax.lax.scan(step, (params, state), None, length=args.steps)
        return losses[-1]

    # --map-seeds: seeds one after another (lax.map) instead of vmap, so each QR is a single, unbatched call.
    run = jax.jit((lambda keys: jax.lax.map(train, keys)) if args.map_seeds else jax.vmap(train))
    for i in range(args.repeats):
        jax.block_until_ready(run(jax.random.split(jax.random.PRNGKey(i), args.seeds)))
    print(f"ok: jax {jax.__version__}, jaxlib {jax.lib.__version__}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="fresh processes")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds before a run counts as hung")
    parser.add_argument("--seeds", type=int, default=4, help="vmapped seeds")
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per call")
    parser.add_argument("--width", type=int, default=64, help="hidden units per layer")
    parser.add_argument("--repeats", type=int, default=20, help="calls of the jitted function per process")
    parser.add_argument("--map-seeds", action="store_true", help="lax.map over seeds instead of vmap")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    command = [sys.executable, os.path.abspath(__file__), "--child", "--seeds", str(args.seeds), "--steps",
               str(args.steps), "--width", str(args.width), "--repeats", str(args.repeats)] + ["--map-seeds"] * args.map_seeds
    hung, failed, times, version = 0, 0, [], ""
    for i in range(args.runs):
        start = time.time()
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            hung += 1
            print(f"run {i + 1}: hung (killed after {args.timeout:g}s)", flush=True)
            continue
        times.append(time.time() - start)
        if proc.returncode != 0:
            failed += 1
            print(f"run {i + 1}: failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}", flush=True)
        else:
            version = proc.stdout.strip().splitlines()[-1]
            print(f"run {i + 1}: finished in {times[-1]:.1f}s", flush=True)
    print(f"{args.runs} runs: {hung} hung, {failed} failed, {args.runs - hung - failed} finished "
          f"({version or 'no version seen'}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"
          f"{'; lax.map over seeds' if args.map_seeds else ''})")


if __name__ == "__main__":
    main()
