"""How fast `flm` starts: wall-clock and CPU seconds of `flm --help`, `flm jobs` and `flm status ID` (best of
`--repeats`, each a fresh process, against a gateway that does not answer, so the figure is the command's own start
and its one failed connection), and the modules that cost most to import at `flm --help` (`python -X importtime`).

    .venv/bin/python benchmarks/startup.py [--repeats 5] [--root DIR]

Each process runs what the `flm` console script runs (`from flm.cli import main; main()`) with the repository (or
`--root`, e.g. an older checkout) first on sys.path. CPU time (user + system, from the child's rusage) is the figure
that does not depend on what else runs on the machine; wall time is what a user waits. Prints JSON and writes
benchmarks/results/startup.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = (["--help"], ["jobs"], ["status", "job-0000000000"])
ENTRY = "import sys; from flm.cli import main; sys.exit(main())"
HEAVY = ("torch", "ray", "fastapi", "deepspeed")


def run_once(root: Path, argv: list[str], env: dict) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one `flm ARGV` process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", ENTRY, *argv], cwd=root, env=env, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def import_profile(root: Path, env: dict, top: int = 12) -> dict:
    """`-X importtime` of `flm --help`: the slowest top-level imports (cumulative ms) and whether a heavy
    framework was imported at all."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", ENTRY, "--help"], cwd=root, env=env,
                         capture_output=True, text=True).stderr
    rows = []
    for line in out.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        _, cumulative, name = line.removeprefix("import time:").split("|")
        rows.append((name.rstrip(), int(cumulative) / 1000))
    outer = sorted(((n.strip(), ms) for n, ms in rows if n.startswith(" ") and not n.startswith("  ")),
                   key=lambda r: -r[1])
    loaded = {n.strip().split(".")[0] for n, _ in rows}
    return {"slowest_ms": {n: round(ms, 1) for n, ms in outer[:top]}, "heavy_imported": sorted(loaded & set(HEAVY))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--root", type=Path, default=ROOT, help="the checkout to measure (default: this one)")
    args = p.parse_args()
    env = {**os.environ, "PYTHONPATH": str(args.root), "FLM_URL": "http://127.0.0.1:9", "FLM_API_KEY": "flm-none",
           "RAY_USAGE_STATS_ENABLED": "0"}
    result = {"root": str(args.root), "repeats": args.repeats, "load_average": os.getloadavg(), "commands": {}}
    for argv in COMMANDS:
        runs = [run_once(args.root, argv, env) for _ in range(args.repeats)]
        result["commands"]["flm " + " ".join(argv)] = {"best_wall_s": round(min(w for w, _ in runs), 3),
                                                       "best_cpu_s": round(min(c for _, c in runs), 3)}
    result["imports_at_help"] = import_profile(args.root, env)
    result["load_average_after"] = os.getloadavg()
    print(json.dumps(result, indent=2))
    out = ROOT / "benchmarks" / "results" / "startup.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
