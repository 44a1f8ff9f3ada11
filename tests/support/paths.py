"""Where the repository lies, for tests that run its scripts or read its files (they may sit at any depth)."""
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
