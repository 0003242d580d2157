"""Do two commits write the same numbers? Runs the pinned tiny recipes at both and compares run files.

    python benchmarks/same_numbers.py BASE [HEAD] [--recipes R ...] [--mode federated|centralized|local]
                                      [--set group.field=value ...]

Each commit is checked out into a temporary git worktree and run with this checkout's virtualenv
(``PYTHONPATH`` points at the worktree, so its own ``fedllm`` is imported). For every recipe it
compares every row of ``metrics.jsonl`` and the ``initial``/``final`` blocks of ``summary.json``
field by field, ignoring only wall-clock fields (``*_time_s``) and ``machine``. Floats must be
bit-identical (``==``), not close. Prints one line per recipe and exits 1 on any difference. This is
how a restructuring proves it "must not change a number".
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PINNED = ["recipes/tiny.yaml", "recipes/tests/tiny_fedavg_iid.yaml", "recipes/tests/faults_30pct.yaml",
          "recipes/examples/tiny_all_groups.yaml"]
OVERRIDES = ["eval.bleu_samples=2", "checkpoint.enabled=false"]


def _comparable(value):
    if isinstance(value, dict):
        return {k: _comparable(v) for k, v in sorted(value.items())
                if not k.endswith("_time_s") and k != "machine"}
    if isinstance(value, list):
        return [_comparable(v) for v in value]
    return value


def run_at(commit: str, recipe: str, mode: str, out: Path, extra: list[str] = ()) -> Path:
    """Run ``recipe`` as of ``commit``; returns the run directory."""
    tree = out / "tree"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(tree), commit],
                   check=True, capture_output=True)
    try:
        env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        cmd = [sys.executable, "-m", "fedllm.cli", "run", str(tree / recipe), "--mode", mode,
               "--out", str(out / "runs"), *OVERRIDES, *extra]
        done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{commit} {recipe}: exit {done.returncode}: {done.stderr.strip()[-400:]}")
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], capture_output=True)
    return next((out / "runs").glob(f"*/{mode}"))


def files(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    summary = json.loads((run / "summary.json").read_text())
    return _comparable({"rows": rows, "initial": summary["initial"], "final": summary["final"]})


def first_difference(a, b, path: str = "") -> str | None:
    if type(a) is not type(b):
        return f"{path}: {a!r} vs {b!r}"
    if isinstance(a, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                return f"{path}.{k}: only in {'base' if k in a else 'head'}"
            if (d := first_difference(a[k], b[k], f"{path}.{k}")) is not None:
                return d
        return None
    if isinstance(a, list):
        if len(a) != len(b):
            return f"{path}: {len(a)} vs {len(b)} items"
        for i, (x, y) in enumerate(zip(a, b)):
            if (d := first_difference(x, y, f"{path}[{i}]")) is not None:
                return d
        return None
    return None if a == b or (a != a and b != b) else f"{path}: {a!r} vs {b!r}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("base", help="the commit before (e.g. the last one before a restructuring)")
    p.add_argument("head", nargs="?", default="HEAD", help="the commit after (default HEAD)")
    p.add_argument("--recipes", nargs="+", default=PINNED, help="recipes, relative to the repository root")
    p.add_argument("--mode", default="federated", choices=("federated", "centralized", "local"))
    p.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE",
                   help="more overrides for every recipe at both commits (e.g. federation.rounds=3)")
    args = p.parse_args(argv)
    commits = {c: subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", c], check=True,
                                 capture_output=True, text=True).stdout.strip() for c in (args.base, args.head)}
    bad = 0
    for recipe in args.recipes:
        with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
            before = files(run_at(args.base, recipe, args.mode, Path(a), args.set))
            after = files(run_at(args.head, recipe, args.mode, Path(b), args.set))
        diff = first_difference(before, after)
        bad += diff is not None
        print(f"{recipe} ({args.mode}, {len(before['rows'])} rows): "
              f"{'identical' if diff is None else 'DIFFERENT at ' + diff} "
              f"[{commits[args.base]} vs {commits[args.head]}]")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
