"""PTQ algorithms. Importing this package registers every plugin (one explicit import each)."""
from ptqkit.algorithms import adaround, brecq, naive, qdrop  # noqa: F401
from ptqkit.algorithms import fdda  # noqa: F401
from ptqkit.algorithms import mrecg  # noqa: F401
from ptqkit.algorithms import pdquant  # noqa: F401
from ptqkit.algorithms import ptmq  # noqa: F401
from ptqkit.algorithms import compose  # noqa: F401
from ptqkit.algorithms.registry import get_algorithm, register, registered_algorithms

__all__ = ["get_algorithm", "register", "registered_algorithms"]
