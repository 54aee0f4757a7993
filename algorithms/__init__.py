"""PTQ algorithms. Importing this package registers every plugin (one explicit import each)."""
from algorithms import adaround, brecq, naive, qdrop  # noqa: F401
from algorithms import fdda  # noqa: F401
from algorithms import mrecg  # noqa: F401
from algorithms import pdquant  # noqa: F401
from algorithms import ptmq  # noqa: F401
from algorithms.registry import get_algorithm, register, registered_algorithms

__all__ = ["get_algorithm", "register", "registered_algorithms"]
