"""voice2music's ground floor. Importing it gives this process its own numba cache slot (see numba_cache.py)
before any librosa code is compiled, and makes sure Prefect's home folder exists: every entry point (CLI, DVC
stages, pool workers, flows, the tests) imports v2m before prefect."""

import os
import sys
from pathlib import Path

from v2m import numba_cache

numba_cache.claim()

# Prefect creates PREFECT_HOME with a plain mkdir (no parents): on a fresh clone `.v2m/` does not exist yet, so
# the temporary server's SQLite file could not be opened and every client call timed out (CI, 2026-12-02).
if os.environ.get("PREFECT_HOME"):
    Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)

# MLflow draws a progress bar for every artifact download, transformers one for every model it loads (through
# huggingface_hub's switch); written to a log or a pipe (`make demo > log`, CI, a Prefect worker) they are hundreds
# of lines of noise. Only a terminal gets them; an explicit setting wins.
if not sys.stderr.isatty():
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
