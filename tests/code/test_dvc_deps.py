"""dvc.yaml's code deps agree with the code the stages' cache keys hash (module_closure)."""

from __future__ import annotations

import yaml

from models import BACKENDS
from tasks.data.track_cache import PROJECT, module_closure

STAGE_MODULES = {"separate": "separate", "validate": "validate", "normalize": "normalize", "label": "label",
                 "split": "split", "segment": "segment", **{f"cache_{b}": "cache_inputs" for b in BACKENDS}}


def test_every_data_stage_lists_exactly_the_code_its_output_depends_on() -> None:
    stages = yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"]
    assert set(stages) == set(STAGE_MODULES)
    for name, module in STAGE_MODULES.items():
        backend = name.removeprefix("cache_") if name.startswith("cache_") else None
        others = tuple(f"models/{b}" for b in BACKENDS if b != backend) if backend else ()
        if name == "separate":  # the learned separator's weights are keyed by their content, not by models/
            others = ("models/",)
        closure = {p.relative_to(PROJECT).as_posix() for p in module_closure(f"{PROJECT}/tasks/data/{module}.py",
                                                                             exclude=others)}
        stage = stages[name].get("do", stages[name])  # separate is a foreach (over params data.mixes)
        code_deps = {d for d in stage["deps"] if d.endswith(".py")}
        assert code_deps == closure, (name, sorted(closure - code_deps), sorted(code_deps - closure))


def test_closure_follows_imports_inside_functions_and_packages() -> None:
    files = {p.relative_to(PROJECT).as_posix() for p in module_closure(PROJECT / "tasks/data/cache_inputs.py")}
    # cache_inputs imports `models`, whose get_backend imports each backend inside a function.
    assert {"models/__init__.py", "models/musicgen.py", "models/audioldm.py", "v2m/audio.py"} <= files
    assert "v2m/config.py" not in files  # settings reach keys as values, not as code
