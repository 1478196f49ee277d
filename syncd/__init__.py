"""syncd: keeps WalkMe segments equal to Heap segments, unattended."""

__version__ = "0.1.0"
