"""How much a busy machine slows the project's commands, before and after choosing threads and OpenMP's wait policy.

The workload is the digits demo's training step (its residual-MLP velocity: width 256, 4 blocks; batch 256, AdamW),
run in a fresh process per setting so the OpenMP runtime reads its environment when it loads (as ``instaflow-pl``
sets ``OMP_WAIT_POLICY`` before torch loads). Each setting is timed alone and next to ``--competitors`` CPU-bound
processes (busy loops), interleaved, best of ``--rounds``. A setting that slows "in proportion" takes about
``(threads + competitors) / cores`` times as long when busy (2 threads and one competitor on 2 cores: 1.5x);
libgomp's default spin-waiting makes it much worse.

Usage::

    PYTHONPATH=src .venv/bin/python bench/busy_machine.py [--steps 150] [--rounds 2] [--competitors 1]

Absolute times on a shared machine mean little; compare the ratios printed for each setting in the same run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import time

SETTINGS = {
    "before (libgomp default wait, torch default threads)": {"OMP_WAIT_POLICY": None, "threads": None},
    "after (OMP_WAIT_POLICY=PASSIVE, one thread per core)": {"OMP_WAIT_POLICY": "PASSIVE", "threads": "cores"},
    "PASSIVE, 1 thread (reference)": {"OMP_WAIT_POLICY": "PASSIVE", "threads": 1},
}

_CHILD = """
import sys, time, torch
threads = sys.argv[2]
if threads == "cores":
    from instaflow_pl.runtime import configure_threads
    configure_threads()
elif threads != "None":
    torch.set_num_threads(int(threads))
from torch import nn
torch.manual_seed(0)
class Block(nn.Module):  # the demo MLP's residual block (instaflow_pl.velocity.mlp), without importing diffusers
    def __init__(self, width):
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(width), nn.Linear(width, width), nn.Linear(width, width)
    def forward(self, h, e):
        return h + self.fc2(nn.functional.silu(self.fc1(self.norm(h)) + e))
width = 256
proj_in, cond, proj_out = nn.Linear(64, width), nn.Linear(16 * 32 + 128, width), nn.Linear(width, 64)
blocks = nn.ModuleList(Block(width) for _ in range(4))
params = [*proj_in.parameters(), *cond.parameters(), *proj_out.parameters(), *blocks.parameters()]
opt = torch.optim.AdamW(params, lr=1e-3)
x, c = torch.randn(256, 64), torch.randn(256, 16 * 32 + 128)
def step():
    h, e = proj_in(x), cond(c)
    for block in blocks:
        h = block(h, e)
    loss = proj_out(h).square().mean()
    opt.zero_grad(); loss.backward(); opt.step()
for _ in range(10):
    step()
start = time.perf_counter()
for _ in range(int(sys.argv[1])):
    step()
print(time.perf_counter() - start, torch.get_num_threads())
"""


def _busy() -> None:
    while True:
        pass


def run_setting(setting: dict, steps: int, timeout: float) -> tuple[float, int]:
    """Seconds for ``steps`` training steps in a fresh process with ``setting`` (``inf`` past ``timeout``); and its
    thread count."""
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    env.pop("OMP_NUM_THREADS", None)
    if setting["OMP_WAIT_POLICY"]:
        env["OMP_WAIT_POLICY"] = setting["OMP_WAIT_POLICY"]
    try:
        out = subprocess.run(
            [sys.executable, "-c", _CHILD, str(steps), str(setting["threads"])],
            env=env, capture_output=True, text=True, check=True, timeout=timeout,
        ).stdout.split()  # fmt: skip
    except subprocess.TimeoutExpired:
        return float("inf"), 0
    return float(out[0]), int(out[1])


def main() -> None:
    """Time every setting idle and busy; print the table (and JSON with --json)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--competitors", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds a run may take (import included)")
    parser.add_argument("--json", action="store_true")
    opts = parser.parse_args()
    best: dict[tuple[str, str], float] = {}
    threads: dict[str, int] = {}
    for _ in range(opts.rounds):
        for busy in (False, True):
            competitors = [multiprocessing.Process(target=_busy, daemon=True) for _ in range(opts.competitors * busy)]
            for process in competitors:
                process.start()
            time.sleep(0.5 if busy else 0)
            try:
                for name, setting in SETTINGS.items():
                    seconds, threads[name] = run_setting(setting, opts.steps, opts.timeout)
                    key = (name, "busy" if busy else "idle")
                    best[key] = min(best.get(key, float("inf")), seconds)
            finally:
                for process in competitors:
                    process.terminate()
                    process.join()
    print(f"{opts.steps} demo training steps, best of {opts.rounds}; busy = {opts.competitors} CPU-bound competitor(s)")
    print(f"cores available: {len(os.sched_getaffinity(0))}, load average now: {os.getloadavg()[0]:.1f}")
    rows = {}
    for name in SETTINGS:
        idle, busy = best[(name, "idle")], best[(name, "busy")]
        rows[name] = {"threads": threads[name], "idle_s": idle, "busy_s": busy, "slowdown": busy / idle}
        print(f"  {name}: {threads[name]} thread(s), idle {idle:.2f} s, busy {busy:.2f} s, slowdown {busy / idle:.2f}x")
    if opts.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
