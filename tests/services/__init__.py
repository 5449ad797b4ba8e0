"""Real services for tests: a single-node Slurm cluster, a Ray head on 127.0.0.1 and more Ray
nodes joining it (``RayNode``).

Each service is a class with ``start()`` / ``stop()`` that owns exactly the
processes and the temporary directory it creates; ``tests/conftest.py`` wraps
them in session-scoped fixtures. Pytest puts ``tests/`` on ``sys.path`` (the
directory of the root ``conftest.py``), so tests import this as ``services``.
"""

from .ray_head import RayHead, RayHeadError
from .ray_node import RayNode
from .slurm import SlurmCluster, SlurmError

__all__ = ["RayHead", "RayHeadError", "RayNode", "SlurmCluster", "SlurmError"]
