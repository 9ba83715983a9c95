"""FedKTL: knowledge transfer from a server-side pre-trained generator to heterogeneous clients.

Importing this package registers the ``fedktl`` algorithm with ``fl_core`` (it is also loaded
through the ``fl_core.algorithms`` entry point, so ``ktl run --set algorithm.name=fedktl``
works without importing anything by hand).
"""

from ktl.fedktl.algorithm import FedKTLClient, FedKTLHParams, FedKTLServer

__all__ = ["FedKTLClient", "FedKTLHParams", "FedKTLServer"]
