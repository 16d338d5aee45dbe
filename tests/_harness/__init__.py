"""In-repo test harnesses (see ``dist.run_distributed`` for multi-rank tests)."""

from tests._harness.dist import RankError, run_distributed

__all__ = ["RankError", "run_distributed"]
