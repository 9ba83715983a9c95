"""FL algorithms: a Client/Server pair plus typed hyperparameters each, registered by name."""

from .base import Client, ClientContext, HParams, Message, Server, TrainSettings, message_nbytes
from .registry import AlgorithmError, get_algorithm, list_algorithms, register_algorithm

__all__ = [
    "AlgorithmError",
    "Client",
    "ClientContext",
    "HParams",
    "Message",
    "Server",
    "TrainSettings",
    "get_algorithm",
    "list_algorithms",
    "message_nbytes",
    "register_algorithm",
]
