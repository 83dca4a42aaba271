"""Run by tests/code/test_warm.py in place of prefect.engine: says what process it finds itself in."""

import json
import os
import sys
import time

if __name__ == "__main__":
    mode = sys.argv[1]
    print(json.dumps({"pid": os.getpid(), "ppid": os.getppid(), "cwd": os.getcwd(), "argv": sys.argv[1:],
                      "probe_env": os.environ.get("PROBE"), "json_loaded": "json" in sys.modules,
                      "project_modules": sorted(m for m in sys.modules if m.split(".")[0] == "v2m"),
                      "stdin": sys.stdin.readline().strip()}), flush=True)
    print("to stderr", file=sys.stderr, flush=True)
    if mode == "sleep":
        time.sleep(120)
    sys.exit(int(sys.argv[2]) if len(sys.argv) > 2 else 0)
