"""The scaling benchmark (`bench.py`) and its tables, target checks and plots (`report.py`)."""
