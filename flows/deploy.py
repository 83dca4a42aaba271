"""`v2m stack deploy`: prefect.yaml's deployments, with the code source from params.yaml written into their
pull steps, so every flow run works in the repository at the configured branch or commit on whatever host
picks it up: the host's checkout of that commit (v2m/checkout.py), made by its first run there and reused.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from v2m.config import CodeSource, Params
from v2m.errors import UserError


def pull_steps(code: CodeSource) -> list[dict[str, Any]]:
    if not code.repository:
        raise UserError("params.yaml orchestration.code.repository: empty; team mode checks the code out on "
                        "every host, so set the git URL the workers can reach")
    pin = ["--commit", code.commit] if code.commit else ["--branch", code.branch]
    script = shlex.join(["python", "-m", "v2m.checkout", "--repository", code.repository, *pin])
    return [{"prefect.deployments.steps.run_shell_script": {"id": "checkout", "script": script,
                                                            "stream_output": False}},
            {"prefect.deployments.steps.set_working_directory": {"directory": "{{ checkout.stdout }}"}}]


def resolved_spec(params: Params, root: Path) -> dict[str, Any]:
    spec = yaml.safe_load((root / "prefect.yaml").read_text())
    spec["pull"] = pull_steps(params.orchestration.code)
    return spec


def deploy_all(params: Params, root: Path, env: dict[str, str]) -> list[str]:
    """Run `prefect deploy --all` on the resolved spec; returns the deployment names."""
    spec = resolved_spec(params, root)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", dir=root, prefix=".prefect-deploy-") as f:
        yaml.safe_dump(spec, f, sort_keys=False)
        f.flush()
        res = subprocess.run([str(Path(sys.executable).parent / "prefect"), "--no-prompt", "deploy", "--all",
                              "--prefect-file", f.name], cwd=root, env={**os.environ, **env},
                             capture_output=True, text=True)
    if res.returncode != 0:
        raise UserError(f"prefect deploy failed:\n{res.stdout[-2000:]}{res.stderr[-2000:]}")
    return [d["name"] for d in spec["deployments"]]
