"""buildgate: queue, reserve memory for and hard-cap builds on a shared Linux host."""

from __future__ import annotations

__version__ = "0.1.0"
