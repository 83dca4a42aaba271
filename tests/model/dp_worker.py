"""One process of a data-parallel training job on the tiny MusicGen-Melody (run by torchrun, or alone):

    python -m torch.distributed.run --nproc-per-node 2 tests/model/dp_worker.py OUT BATCH PARALLEL \
        [--uri s3://bucket/prefix] [--stop-after STEPS]

Trains STEPS optimizer steps of 2 micro-batches each through the project's trainer and writes, from rank 0,
OUT/result.json (losses, how the model was shared, where it resumed) and OUT/final.safetensors (the trained
tensors, read back from the last checkpoint). Nothing random separates the processes' work: no dropout, no
condition dropout, whole items, so N processes at BATCH compute what one process computes at N x BATCH.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from models.musicgen import MusicGenBackend  # noqa: E402
from tasks.training import distributed  # noqa: E402
from tasks.training.checkpoints import load_checkpoint  # noqa: E402
from tasks.training.trainer import train  # noqa: E402
from v2m.config_musicgen import ConditionDropout, MusicGenArch, MusicGenConfig, MusicGenPreset  # noqa: E402
from v2m.config_train import TrainConfig  # noqa: E402

STEPS, ITEMS, SECONDS = 4, 16, 1.0


def items() -> list[dict]:
    rng = np.random.default_rng(0)
    frames = int(SECONDS * 50)
    return [{"codes": rng.integers(0, 64, (4, frames)).astype(np.int16),
             "chroma": np.eye(12, dtype=np.float32)[rng.integers(0, 12, int(SECONDS * 32000 / 4096) + 1)],
             # one prompt: T5 pads a batch to its longest prompt, which shifts the decoder's positions of the codes
             # (MusicGen's prefix is [chroma ; text]), so a batch split in two would see other positions
             "prompt": "disco music for input vocals"} for _ in range(ITEMS)]


def main(out: Path, batch_size: int, parallel: str, uri: str, stop_after: int | None) -> None:
    cfg = MusicGenConfig(preset="t", presets={"t": MusicGenPreset(arch=MusicGenArch(dropout=0.0))}, crop_s=SECONDS,
                         condition_dropout=ConditionDropout(joint=0.0, text=0.0, chroma=0.0))
    tcfg = TrainConfig(max_steps=STEPS, batch_size=batch_size, grad_accum=2, lr=3e-3, warmup_steps=1,
                       weight_decay=0.1, crop_s=SECONDS, checkpoint_every=2, val_every=2, samples=0,
                       checkpoint_uri=uri, **({"parallel": parallel} if parallel != "ddp" else {}))
    with distributed.process_group("cpu"):
        backend = MusicGenBackend.from_preset(cfg, "t", seed=0)
        data = items()
        result = train(backend, data, data[:2], tcfg, "voice_text", out / "run", seed=3, stop_after=stop_after)
        if distributed.is_main():
            (out / "result.json").write_text(json.dumps({
                "losses": result.losses, "parallel": getattr(result, "parallel", "?"),
                "resumed_from": result.resumed_from, "world": distributed.world_size()}))
            from safetensors.torch import save_file
            save_file(load_checkpoint(result.checkpoint)["model"], str(out / "final.safetensors"))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("batch_size", type=int)
    ap.add_argument("parallel")
    ap.add_argument("--uri", default="")
    ap.add_argument("--stop-after", type=int)
    a = ap.parse_args()
    main(a.out, a.batch_size, a.parallel, a.uri, a.stop_after)
