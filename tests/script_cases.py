"""Command-line cases of one script, all run in one fresh Python process: each case runs the script as
`python SCRIPT ARGV...` would (its `__main__` block, through runpy), with its own stdout, stderr and exit status.
One process per script instead of one per case: each start mostly imports JAX, flax and gymnax (about 8 s of CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Run in the child: an exception escaping the script would have printed a traceback and exited 1.
CHILD = r"""
import contextlib, io, json, runpy, sys, traceback
script, cases = sys.argv[1], json.loads(sys.argv[2])
sys.path.insert(0, ".")
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    runpy.run_path(script, run_name="imports")  # the imports, once, before any case runs
results = {}
for name, argv in cases.items():
    out, err, code = io.StringIO(), io.StringIO(), 0
    sys.argv = [script, *argv]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
            if not isinstance(stop.code, (int, type(None))):
                print(stop.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            code = 1
    results[name] = dict(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())
print(json.dumps(results))
"""


def start(script: str, cases: dict[str, list[str]], timeout: float = 300):
    """Start the cases now; the returned function waits for them and gives {name: (returncode, stdout, stderr)}
    as SimpleNamespace objects."""
    env = dict(os.environ, COLUMNS="200", JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, "-c", CHILD, script, json.dumps(cases)], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    results = {}

    def wait() -> dict[str, SimpleNamespace]:
        if not results:
            stdout, stderr = proc.communicate(timeout=timeout)
            assert proc.returncode == 0, stderr[-3000:]
            results.update({name: SimpleNamespace(**r) for name, r in json.loads(stdout.splitlines()[-1]).items()})
        return results

    wait.process = proc
    return wait


def run(script: str, cases: dict[str, list[str]], timeout: float = 300) -> dict[str, SimpleNamespace]:
    return start(script, cases, timeout)()
