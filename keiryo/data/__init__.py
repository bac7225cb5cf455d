"""Dataset adapters and deterministic splits.

``load_data(spec)`` reads a source and returns :class:`DataSplits`: train (streamed through a
DataLoader) and val / test / calib held in memory (each capped by an option), with the inputs
described as named tensors. Evaluation uses ``test`` only; calibration samples come from train.

Sources (``--data``):

- ``digits``: scikit-learn's bundled ``load_digits`` (options ``size``, ``channels``)
- ``sensors``: generated multichannel sensor windows, target = next value (regression)
- ``tokens``: generated token ids + attention mask, a class label (sequence classification)
- ``file.npz`` / ``file.safetensors``: named arrays matching the model's inputs, plus a label array
  (option ``label``, default ``y``; ``label=null`` for none)
- ``path/to/dir/``: an image folder, one sub-folder per class, read lazily (``size``, ``crop``,
  ``mean``, ``std``, ``channels``, ``channel_order``)
- ``file.csv``: feature columns + a target column (``label``, ``features``)
- ``package.module:function`` or ``file.py:function`` returning torch Datasets whose items are
  dicts of tensors, ``(inputs..., target)`` tuples or tensors
"""

from keiryo.data.splits import DataSpec, DataSplits, MemorySplit, Split, TargetInfo, load_data

__all__ = ["DataSplits", "DataSpec", "MemorySplit", "Split", "TargetInfo", "load_data"]
