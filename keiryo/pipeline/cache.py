"""On-disk cache of torch-stage results by content hash.

The key is a sha256 over the input model's content hash, the data's fingerprint, the
torch-level steps (type, version, params) and the seed. The value is the exported
file after those steps plus their recorded effects, so a recipe that shares that
prefix (the same pruning + distillation, then another quantization) skips it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any


class StepCache:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    @staticmethod
    def key(model_hash: str, data_fingerprint: str, steps: list[dict[str, Any]], target: str, seed: int) -> str:
        blob = json.dumps({"m": model_hash, "d": data_fingerprint, "s": steps, "t": target, "seed": seed}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def get(self, key: str) -> tuple[Path, dict[str, Any]] | None:
        d = self.root / key[:2] / key
        meta = d / "meta.json"
        if not meta.is_file():
            return None
        info = json.loads(meta.read_text())
        f = d / info["file"]
        return (f, info) if f.is_file() else None

    def put(self, key: str, artifact: Path, meta: dict[str, Any]) -> None:
        final = self.root / key[:2] / key
        if final.exists():
            return
        from keiryo._atomic import atomic_dir

        try:
            with atomic_dir(final, replace=False) as tmp:
                shutil.copy2(artifact, tmp / artifact.name)
                (tmp / "meta.json").write_text(json.dumps({**meta, "file": artifact.name}))
        except OSError:
            pass  # a concurrent writer of the same key won the race: its entry is as good
