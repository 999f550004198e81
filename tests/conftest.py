import os, sys; sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tempfile

# The suite's time is XLA compiling tiny programs: LLVM's optimisation passes are most of it and buy nothing at
# these sizes. Set before jax starts its backend; subprocesses started by tests inherit it.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402

# Persistent compilation cache: test_train_lopt.py meta-trains several times with identical tiny settings;
# each run jits a fresh closure, which misses JAX's in-memory cache but hits this on-disk one (same HLO).
# Measured on 2 busy CPU cores, tests/test_train_lopt.py: 411 s without it; with it 245 s from an empty
# cache and about 100-115 s once it is warm.
jax.config.update("jax_compilation_cache_dir", os.path.join(tempfile.gettempdir(), "jax_cache_lopt_tests"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
