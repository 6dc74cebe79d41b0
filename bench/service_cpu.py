"""CPU seconds each service process spends during one benchmark run: where a throughput change comes from.

On 2 cores the engine's throughput follows the CPU its five processes need, and wall-clock figures swing by
about 10 % between identical runs; CPU seconds per service are steadier. Runs `bench/run_bench.py` (of
PROJECT_ROOT, default this checkout, with that root first on PYTHONPATH) and samples /proc every 0.1 s for
every `python -m services...` process, then prints the CPU each service used (summed over its processes).

    python bench/service_cpu.py [PROJECT_ROOT] [--scenarios engine-sqlite] [--messages 40000]

Compare two commits one after the other, alternating, on a quiet machine (a worktree of the older one as
PROJECT_ROOT, this venv's Python).
"""
from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def service_processes() -> dict[int, str]:
    """pid -> module of every running `python -m services...` process."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"-m" in argv[:-1]:
            module = argv[argv.index(b"-m") + 1].decode(errors="replace")
            if module.startswith("services"):
                found[int(entry)] = module
    return found


def cpu_ticks(pid: int) -> int | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[11]) + int(fields[12])  # utime + stime


def sample(stop: threading.Event, last: dict[tuple[int, str], int]) -> None:
    while not stop.wait(0.1):
        for pid, module in service_processes().items():
            if (ticks := cpu_ticks(pid)) is not None:
                last[(pid, module)] = ticks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", nargs="?", default=str(ROOT), help="the project checkout to run")
    parser.add_argument("--scenarios", default="engine-sqlite")
    parser.add_argument("--messages", type=int, default=40_000)
    args = parser.parse_args()
    root = Path(args.root).resolve()

    last: dict[tuple[int, str], int] = {}
    stop = threading.Event()
    sampler = threading.Thread(target=sample, args=(stop, last), daemon=True)
    sampler.start()
    env = {**os.environ, "PYTHONPATH": str(root)}
    run = subprocess.run(
        [sys.executable, "bench/run_bench.py", "--runs", "1", "--scenarios", args.scenarios,
         "--messages", str(args.messages)], cwd=root, env=env, capture_output=True, text=True)
    stop.set()
    sampler.join()
    print(f"project root {root}")
    print("\n".join(line for line in run.stdout.splitlines() if line.startswith("  ") and "run 1" not in line))
    if run.returncode:
        print(run.stderr[-2000:], file=sys.stderr)
        raise SystemExit(run.returncode)
    per_service: collections.Counter[str] = collections.Counter()
    for (_pid, module), ticks in last.items():
        per_service[module] += ticks
    for module, ticks in sorted(per_service.items()):
        print(f"  {module:40s} {ticks / CLOCK_TICKS:7.2f} CPU s")
    print(f"  {'all services':40s} {sum(per_service.values()) / CLOCK_TICKS:7.2f} CPU s")


if __name__ == "__main__":
    main()
