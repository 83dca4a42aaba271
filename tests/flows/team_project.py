"""A team project for the two-host tests and bench/team_retrain.py: this repository's tracked files with team
params in a bare git repository, and the raw data added with DVC and pushed to the stack's S3 remote by its
owner (the way a team publishes data: `dvc add`, commit the .dvc file, `dvc push`)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import make_dataset
from tests.model.conftest import OVERRIDES, merge
from v2m.s3server import SeaweedS3
from v2m.stack import Stack

REPO = Path(__file__).resolve().parents[2]
TEAM = merge(OVERRIDES, {
    "dvc": {"remote": "s3", "s3": {"url": "s3://v2m-dvc/dvc"}},
    "orchestration": {"mode": "team", "step_attempts": 2},
    "retrain": {"backends": ["musicgen", "audioldm"], "musicgen_stages": ["voice"], "audioldm_variants": ["voice"]},
    # MusicGen trains long enough to be killed between two checkpoints (3 checkpoints after the first); they go
    # to S3. Each step of a team test is paid twice on a loaded 2-core CI runner: keep them few.
    "train": {"musicgen": {"max_steps": 12, "checkpoint_every": 3, "val_every": 20,
                           "checkpoint_uri": "s3://v2m-checkpoints/runs/musicgen"},
              "audioldm": {"max_steps": 2, "checkpoint_every": 2, "val_every": 2}},
})


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def publish_project(stack: Stack, work: Path, overrides: dict = TEAM,
                    files: dict[str, str] | None = None) -> tuple[Path, Path]:
    """The team's repository: this project's tracked files, team params, and the raw data added with DVC
    and pushed to the S3 remote by its owner; `files` (path -> text) are committed as well, even under data/.
    Returns (the owner's checkout, the bare repository)."""
    owner, bare = work / "owner", work / "voice2music.git"
    for rel in git(REPO, "ls-files").splitlines():
        if (REPO / rel).is_file():
            (owner / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, owner / rel)
    params = merge(yaml.safe_load((owner / "params.yaml").read_text()), overrides)
    params["orchestration"]["code"] = {"repository": str(bare), "branch": "main", "commit": ""}
    (owner / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    spec = yaml.safe_load((owner / "prefect.yaml").read_text())
    for d in spec["deployments"]:  # GPU steps run on the CPU here
        if d["work_pool"].get("job_variables"):
            d["work_pool"]["job_variables"]["device"] = "cpu"
    (owner / "prefect.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    make_dataset(owner / "data" / "raw", n_tracks=6, n_artists=3, seconds=12.0)
    env = {**stack.client_env("cpu"), "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"}
    git(owner, "init", "-q", "-b", "main")
    dvc = str(Path(sys.executable).parent / "dvc")
    for cmd in (["add", "-q", "data/raw"], ["remote", "add", "-d", "--local", "s3", "s3://v2m-dvc/dvc"],
                ["push", "-q", "data/raw.dvc"]):
        subprocess.run([dvc, *cmd], cwd=owner, env=env, check=True, capture_output=True)
    for rel, text in (files or {}).items():
        (owner / rel).parent.mkdir(parents=True, exist_ok=True)
        (owner / rel).write_text(text)
        git(owner, "add", "-f", rel)
    git(owner, "add", "-A")
    git(owner, "-c", "user.name=owner", "-c", "user.email=o@example.com", "commit", "-qm", "team project")
    git(work, "clone", "-q", "--bare", str(owner), str(bare))
    return owner, bare


def s3_keys(stack: Stack, bucket: str) -> dict[str, int]:
    creds, state = stack.credentials()["s3"]["admin"], stack.state()
    s3 = SeaweedS3(stack.state_dir / "unused", access_key=creds["access_key"], secret_key=creds["secret_key"],
                   s3_port=int(state["s3_url"].rsplit(":", 1)[1]))
    pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return {o["Key"]: o["Size"] for page in pages for o in page.get("Contents", [])}


def push_params(owner: Path, bare: Path, text: str, message: str) -> None:
    """Commit params.yaml with `text` to the team's repository (the way a team turns a gate on): every flow run
    started from now on checks that commit out."""
    (owner / "params.yaml").write_text(text)
    git(owner, "-c", "user.name=owner", "-c", "user.email=o@example.com", "commit", "-qam", message)
    git(owner, "push", "-q", str(bare), "HEAD:main")
