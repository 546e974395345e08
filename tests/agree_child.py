"""One process of tests/test_multiprocess.py's `agree` test: joins a 2-process CPU run and
prints one line per step: ``<pid> <step> ok`` or ``<pid> <step> <error type> <alike> <message>``."""
import sys
import time

import jax

pid, port = int(sys.argv[1]), sys.argv[2]
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
from wideep_jax.processes import agree, raised_alike  # noqa: E402


def step(tag, **kwargs):
    try:
        agree(tag, **kwargs)
        print(pid, tag, "ok", flush=True)
    except Exception as err:
        print(pid, tag, type(err).__name__, raised_alike(err), str(err).replace("\n", " "), flush=True)


step("same", settings={"a": "1"})
step("differ", settings={"a": str(pid), "b": "x"})
step("fail", error=ValueError("bad value on one") if pid == 1 else None)
step("bug", error=KeyError("k") if pid == 0 else None)
if pid == 0:  # process 1 skips this step (as one that crashed before it would)
    step("skipped", settings={"a": "1"}, timeout_s=2)
time.sleep(3)
step("after", settings={"a": "1"}, timeout_s=20)  # no stale record of "skipped" is read
