"""The one GPU call, prepared here: `make gpu-wheelhouse` holds exactly the wheels the lent image lacks (under
64 MiB), they need nothing the image does not have, and bench/gpu_acceptance.sh --tiny runs end to end on the
image's packages plus those wheels alone, ending with the JSON line of figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

ROOT = Path(__file__).resolve().parents[2]
# what the lent machine runs: CPython 3.12 on x86-64 Linux
GPU_ENV = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.3",
           "implementation_name": "cpython", "platform_python_implementation": "CPython", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix"}


def listed(path: Path) -> dict[str, tuple[str | None, str]]:
    """name -> (pinned version or None, the line's comment) of a bench/gpu_*.txt list."""
    out = {}
    for line in path.read_text().splitlines():
        spec, _, comment = line.partition("#")
        if spec.strip():
            name, _, version = spec.strip().partition("==")
            out[canonicalize_name(name)] = (version or None, comment.strip())
    return out


IMAGE, WHEELS = listed(ROOT / "bench/gpu_image.txt"), listed(ROOT / "bench/gpu_wheels.txt")


def make_wheelhouse(dest: Path, python_version: str = "3.12") -> Path:
    done = subprocess.run(["make", "--no-print-directory", "gpu-wheelhouse", f"WHEELHOUSE={dest}",
                           f"GPU_PYTHON_VERSION={python_version}", f"PYTHON={sys.executable}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return dest


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory) -> Path:
    return make_wheelhouse(tmp_path_factory.mktemp("gpu") / "wheelhouse")


def test_make_gpu_wheelhouse_holds_exactly_the_listed_wheels_under_64_mib(wheelhouse: Path) -> None:
    files = sorted(wheelhouse.iterdir())
    assert all(f.suffix == ".whl" for f in files)
    found = {canonicalize_name(n): str(v) for n, v, _, _ in map(lambda f: parse_wheel_filename(f.name), files)}
    assert found == {name: version for name, (version, _) in WHEELS.items()}
    assert sum(f.stat().st_size for f in files) < 64 * 2**20  # what may travel to the GPU machine


def test_the_wheels_are_what_the_image_lacks_and_need_nothing_more(wheelhouse: Path) -> None:
    for name, (version, comment) in WHEELS.items():
        if name in IMAGE:  # carried anyway only for another version, said why
            assert comment.startswith("override:") and IMAGE[name][0] != version, name
    for wheel in wheelhouse.glob("*.whl"):
        with zipfile.ZipFile(wheel) as z:
            meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
        for line in meta.splitlines():
            if not line.startswith("Requires-Dist:"):
                continue
            req = Requirement(line.removeprefix("Requires-Dist:").strip())
            if req.marker is not None and not req.marker.evaluate({**GPU_ENV, "extra": ""}):
                continue  # an extra, or another Python or platform
            name = canonicalize_name(req.name)
            assert name in IMAGE or name in WHEELS, f"{wheel.name} needs {req}, which neither carries"
            version = WHEELS[name][0] if name in WHEELS else IMAGE[name][0]
            if version is not None:  # the version there is on record: it must do
                assert req.specifier.contains(version, prereleases=True), f"{wheel.name} needs {req}, has {version}"


def image_packages() -> set[str]:
    """The image's packages as installed here, with what these versions of them require (a package there comes
    with its own version's requirements: e.g. huggingface-hub 2.x here needs httpx2, the image's 1.33 does not),
    but never a package of the wheel list: those must come from the wheels."""
    installed = {canonicalize_name(d.metadata["Name"]): d for d in metadata.distributions()}
    todo = [n for n in IMAGE if n in installed]
    found = set(todo)
    while todo:
        for line in installed[todo.pop()].requires or []:
            req = Requirement(line)
            name = canonicalize_name(req.name)
            if (req.marker is None or req.marker.evaluate({"extra": ""})) and name not in found | set(WHEELS) \
                    and name in installed:
                found.add(name)
                todo.append(name)
    return found


def image_site(dest: Path) -> Path:
    """A site folder with only the image's packages, linked from this environment: with `python -S` (no
    site-packages) and this on PYTHONPATH, an import of anything the image lacks fails as it would there."""
    dest.mkdir()
    wanted = image_packages()
    for dist in metadata.distributions():
        if canonicalize_name(dist.metadata["Name"]) not in wanted:
            continue
        base = Path(dist.locate_file(""))
        for top in {f.parts[0] for f in dist.files or [] if f.parts and f.parts[0] != ".."}:
            link = dest / top
            if not link.exists() and (base / top).exists():
                link.symlink_to(base / top)
    return dest


def test_the_acceptance_run_works_on_the_image_packages_plus_the_wheels(tmp_path: Path) -> None:
    # The same pins built for this machine's Python (the GPU's 3.12 wheels do not load on it).
    wheels = make_wheelhouse(tmp_path / "wheelhouse", f"{sys.version_info.major}.{sys.version_info.minor}")
    env = {**os.environ, "PYTHON": f"{sys.executable} -S", "PYTHONPATH": str(image_site(tmp_path / "image")),
           "WHEELHOUSE": str(wheels), "OUT": str(tmp_path / "out")}
    done = subprocess.run(["bash", "bench/gpu_acceptance.sh", "--tiny"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"installed {len(WHEELS)} wheels" in done.stdout
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures == json.loads((tmp_path / "out" / "gpu_acceptance.json").read_text())
    assert figures["ok"] and figures["conditioning_changes_codes"] is True and figures["resume_exact"] is True
    assert figures["conditioning"]["musicgen"] == {"melody": True, "prompt": True}
    for backend in ("musicgen", "audioldm"):
        assert figures[f"{backend}_step_s"] > 0 and figures[f"{backend}_tokens_per_s"] > 0
        assert 0 < figures[f"{backend}_mfu"] < 1
        assert figures["rtf_10s"][backend] > 0 and figures["rtf_30s"][backend] > 0
    assert "peak_gib" in figures  # null on the CPU
    assert figures["ddp"]["world"] == 2 and figures["ddp"]["parallel"] == "ddp"
