"""The benchmark scripts import each other as top-level modules (each also runs alone)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
