"""Privacy: differentially private training (Opacus DP-SGD), federated learning on Flower with compressed
updates, and encrypted packages (AES-256-GCM envelopes).

Nothing here imports Opacus, Flower or ``cryptography`` at import time: each backend is imported by the
function that needs it and a missing one is a :class:`~keiryo.errors.BackendUnavailableError` naming the
extra (``privacy`` or ``federated``).
"""

from __future__ import annotations

from keiryo.privacy.dp import DPConfig

__all__ = ["DPConfig"]
