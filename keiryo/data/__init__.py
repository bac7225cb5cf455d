"""Dataset adapters and deterministic splits.

``load_data(spec)`` reads one of the supported sources into memory and returns
:class:`DataSplits` with train / val / test and a calibration subset drawn from
train. Evaluation uses ``test`` only.

Sources (``--data``):

- ``digits``: scikit-learn's bundled ``load_digits`` (options ``size``, ``channels``)
- ``path/to/file.npz`` with arrays ``x`` and ``y``
- ``path/to/dir/``: an image folder, one sub-folder per class (options ``size``, ``channels``)
- ``path/to/file.csv``: feature columns + a label column (option ``label``, default ``label``)
- ``package.module:function`` or ``file.py:function`` returning torch Datasets
"""

from keiryo.data.splits import DataSpec, DataSplits, Split, load_data

__all__ = ["DataSplits", "DataSpec", "Split", "load_data"]
