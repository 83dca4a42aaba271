"""The MLflow pyfunc wrapper: a logged or registered model that generates from a vocal plus a prompt.

    model = mlflow.pyfunc.load_model("models:/voice2music-musicgen@champion")
    out = model.predict(pd.DataFrame([{"vocal_path": "take.wav", "prompt": "Disco music for input vocals",
                                        "duration_s": 8.0, "seed": 0}]))
    out.loc[0, "audio"]  # float32 mono at out.loc[0, "sample_rate"]

`vocal_path` may be empty/None (text only) and `prompt` empty/None (voice only).

A remote client (`mlflow models serve`, MLflow's own scoring server) cannot name a path on the server, and a
column of float samples is ~1.3 MB of JSON for 2 s of audio. So the vocal may also come as `vocal_b64`: a WAV,
FLAC or MP3 file in base64 (`vocal_format`, default wav), decoded within `v2m serve`'s bounds (v2m/upload.py:
size, rate, channels and length judged from the header first), and `output: wav_base64` (the default when the
vocal came as base64) answers `audio_b64`, a 16-bit WAV in base64, instead of `audio`:

    POST /invocations {"dataframe_records": [{"vocal_b64": "<base64 of take.wav>", "prompt": "...",
                                             "duration_s": 8.0, "seed": 0}]}
    -> {"predictions": [{"audio_b64": "<base64 of a WAV>", "sample_rate": 32000, ...}]}

A bad vocal or duration raises MlflowException(INVALID_PARAMETER_VALUE): the scoring server answers 400 with the
reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd

from v2m.audio import read_mono

OUTPUTS = ("array", "wav_base64")

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
            duration = float(_given(row.get("duration_s")) or 8.0)
            vocal, sr = (None, 0)
            if _given(row.get("vocal_b64")):
                vocal, sr = decode_b64(row["vocal_b64"], _given(row.get("vocal_format")) or "wav", duration)
            elif _given(row.get("vocal_path")):
                vocal, sr = read_mono(row["vocal_path"])
            output = _given(row.get("output")) or ("wav_base64" if _given(row.get("vocal_b64")) else "array")
            if output not in OUTPUTS:
                _invalid(f"output {output!r}: use one of {', '.join(OUTPUTS)}")
            request = Request(vocal, sr, _given(row.get("prompt")) or None, duration,
                              int(_given(row.get("seed")) or 0))
            # whole songs in windows, with the default windows and limit of params.yaml `generate:`
            audio = generate_long(self.backend, request, GenerateConfig(), _given(row.get("guidance_scale")),
                                  None if _given(row.get("steps")) is None else int(row["steps"]))
            rate = self.backend.sample_rate
            rows.append({"audio_b64": wav_b64(audio, rate), "format": "wav", "sample_rate": rate}
                        if output == "wav_base64" else {"audio": audio, "sample_rate": rate})
        return pd.DataFrame(rows)


def _invalid(message: str) -> None:
    from mlflow.exceptions import INVALID_PARAMETER_VALUE, MlflowException
    raise MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def decode_b64(text: str, fmt: str, duration_s: float):
    """A base64 audio file -> (mono float32, rate), within `v2m serve`'s default bounds (serve: in params.yaml):
    the encoded size is checked before decoding it, the audio's header before decoding the audio."""
    import base64
    import binascii

    from v2m.config_serve import ServeConfig
    from v2m.upload import RequestError, decode_vocal, max_upload_bytes
    cfg = ServeConfig()
    if not 0 < duration_s <= cfg.max_duration_s:
        _invalid(f"duration_s {duration_s:g}: between 0 and {cfg.max_duration_s:g} s")
    if not isinstance(text, str) or len(text) > max_upload_bytes(cfg) * 4 // 3 + 4:
        _invalid(f"vocal_b64: base64 text of at most {cfg.max_upload_mb:g} MB of audio")
    try:
        data = base64.b64decode(text, validate=True)
        return decode_vocal(data, f"vocal.{fmt}", cfg, duration_s)
    except binascii.Error:
        _invalid("vocal_b64 is not valid base64")
    except RequestError as exc:
        _invalid(f"vocal_b64: {exc.detail}")


def wav_b64(audio, sample_rate: int) -> str:
    """A 16-bit mono WAV in base64: 4/3 of 2 bytes a sample, instead of ~20 characters of JSON per sample."""
    import base64
    import io

    import soundfile as sf
    buf = io.BytesIO()
    sf.write(buf, audio, sample_rate, format="WAV", subtype="PCM_16")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def log_pyfunc(backend_name: str, model_dir: Path) -> str:
    """Log the saved model folder as this run's pyfunc model (MLflow 3: name=...); returns the model URI."""
    info = mlflow.pyfunc.log_model(name="model", python_model=InstrumentalGenerator(),
                                   artifacts={"model": str(model_dir)}, model_config={"backend": backend_name},
                                   pip_requirements=pip_requirements(), code_paths=code_paths())
    return info.model_uri
