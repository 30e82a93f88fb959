"""Start-up time of the ``steer`` command (not a test): ``steer --help`` and ``steer methods`` must not import
torch, transformers or diffusers (target: under 1.5 s on the 2-core CI machine).

    python benchmarks/startup.py [--repeats 5]

Prints, per command, the median wall time of ``python -m steer.cli ...`` in a fresh process, the cumulative
import time of ``steer.cli`` from ``python -X importtime`` and whether torch/transformers/diffusers were imported.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

COMMANDS = {"steer --help": ["--help"], "steer methods": ["methods"], "steer --version": ["--version"]}
PROBE = (
    "import sys, runpy; sys.argv = ['steer'] + {args!r}\n"
    "try:\n    runpy.run_module('steer.cli', run_name='__main__')\nexcept SystemExit:\n    pass\n"
    "print('HEAVY', sorted(m for m in ('torch', 'transformers', 'diffusers') if m in sys.modules), file=sys.stderr)"
)


def run(args: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PROBE.format(args=args)], capture_output=True, text=True, timeout=300)
    elapsed = time.perf_counter() - start
    heavy = next((line for line in done.stderr.splitlines() if line.startswith("HEAVY")), "HEAVY ?")
    return elapsed, heavy[len("HEAVY ") :]


def import_time() -> float:
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", "import steer.cli"], capture_output=True, text=True)
    for line in done.stderr.splitlines():
        if line.rstrip().endswith("| steer.cli"):
            return int(line.split("|")[1]) / 1e6
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}; median of {args.repeats} fresh processes")
    print(f"{'command':<18} {'wall s':>7}  heavy modules imported")
    for name, argv in COMMANDS.items():
        times, heavy = [], ""
        for _ in range(args.repeats):
            t, heavy = run(argv)
            times.append(t)
        print(f"{name:<18} {statistics.median(times):7.2f}  {heavy}")
    print(f"import steer.cli (cumulative, -X importtime): {import_time():.2f} s")


if __name__ == "__main__":
    main()
