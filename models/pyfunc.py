"""The MLflow pyfunc wrapper: a logged or registered model that generates from a vocal plus a prompt.

    model = mlflow.pyfunc.load_model("models:/voice2music-musicgen@champion")
    out = model.predict(pd.DataFrame([{"vocal_path": "take.wav", "prompt": "Disco music for input vocals",
                                        "duration_s": 8.0, "seed": 0}]))
    out.loc[0, "audio"]  # float32 mono at out.loc[0, "sample_rate"]

`vocal_path` may be empty/None (text only) and `prompt` empty/None (voice only).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd

from v2m.audio import read_mono

# The model is self-contained: this project's `models` and `v2m` packages travel inside it (code_paths) and
# its requirements name only published packages, pinned to the versions it was logged with, so
# `mlflow models serve -m models:/voice2music-musicgen@champion` works in a fresh environment.
CODE_PACKAGES = ("models", "v2m")
REQUIREMENTS = ("torch", "transformers", "diffusers", "peft", "safetensors", "sentencepiece", "tokenizers",
                "numpy", "scipy", "soundfile", "soxr", "librosa", "pydantic", "pyyaml", "pandas", "boto3", "mlflow")


def pip_requirements() -> list[str]:
    """REQUIREMENTS at the versions installed here (a local suffix such as +cpu dropped: pip picks the build)."""
    from importlib.metadata import PackageNotFoundError, version
    out = []
    for name in REQUIREMENTS:
        try:
            out.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:
            out.append(name)
    return out


def code_paths() -> list[str]:
    root = Path(__file__).resolve().parents[1]
    return [str(root / pkg) for pkg in CODE_PACKAGES]


def _given(value: Any) -> Any:
    """None for absent cells (None or NaN: pandas fills a missing column with NaN)."""
    return None if value is None or (isinstance(value, float) and value != value) else value


class InstrumentalGenerator(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from models import default_device, get_backend
        self.backend = get_backend(context.model_config["backend"]).load(Path(context.artifacts["model"]),
                                                                         device=default_device())

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        from models.longform import Request, generate_long
        from v2m.config_serve import GenerateConfig
        rows = []
        for row in model_input.to_dict("records"):
            vocal, sr = (None, 0)
            if row.get("vocal_path"):
                vocal, sr = read_mono(row["vocal_path"])
            request = Request(vocal, sr, row.get("prompt") or None, float(row.get("duration_s", 8.0)),
                              int(row.get("seed", 0)))
            # whole songs in windows, with the default windows and limit of params.yaml `generate:`
            audio = generate_long(self.backend, request, GenerateConfig(), _given(row.get("guidance_scale")),
                                  None if _given(row.get("steps")) is None else int(row["steps"]))
            rows.append({"audio": audio, "sample_rate": self.backend.sample_rate})
        return pd.DataFrame(rows)


def log_pyfunc(backend_name: str, model_dir: Path) -> str:
    """Log the saved model folder as this run's pyfunc model (MLflow 3: name=...); returns the model URI."""
    info = mlflow.pyfunc.log_model(name="model", python_model=InstrumentalGenerator(),
                                   artifacts={"model": str(model_dir)}, model_config={"backend": backend_name},
                                   pip_requirements=pip_requirements(), code_paths=code_paths())
    return info.model_uri
