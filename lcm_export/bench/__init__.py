"""``lcm-export bench``: the timing harness (``harness``), the PyTorch baselines (``baselines``), the report
writer (``report``) and the runtime's host overhead (``overhead``)."""
