"""Wall time of an unchanged re-run of the retrain flow against the first run (target: <= 10 %).

    python bench/retrain_rerun.py [--max-steps N]

Runs in a scratch copy of the project's demo data (build it with `make demo` or `v2m data demo` first), so
the first run really trains; both runs share this process's Prefect server, as scheduled runs share one.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-steps", type=int, default=None)
    args = ap.parse_args()
    raw = ROOT / "data" / "raw"
    if not (raw / "metadata.csv").is_file():
        sys.exit(f"{raw}: no demo data; run `make demo` or `v2m data demo` first")
    work = Path(tempfile.mkdtemp(prefix="v2m-rerun-"))
    try:
        for name in ("params.yaml", "dvc.yaml"):
            shutil.copy(ROOT / name, work)
        for pkg in ("tasks", "v2m", "models"):
            shutil.copytree(ROOT / pkg, work / pkg, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copytree(raw, work / "data" / "raw")
        for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
            subprocess.run(cmd, cwd=work, check=True)
        os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"]
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        os.chdir(work)
        from flows.retrain import retrain
        t = time.perf_counter()
        retrain(project_dir=str(work), max_steps=args.max_steps)
        first = time.perf_counter() - t
        t = time.perf_counter()
        out = retrain(project_dir=str(work), max_steps=args.max_steps)
        second = time.perf_counter() - t
        trained = sum(s["trained"] for b in out["backends"].values() for s in b["steps"])
        print(f"first retrain run:          {first:7.1f} s")
        print(f"unchanged re-run:           {second:7.1f} s ({trained} fine-tunes trained)")
        print(f"re-run / first: {second / first:.3f} (target <= 0.10)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
