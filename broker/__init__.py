"""The zrpc broker: its sans-IO cores (broker/_core: dispatch, Binary Star, monitor, and
BrokerCore, the policy between them) and the socket loop that runs them."""

from zrpc.broker._core._dispatch import Dispatcher
from zrpc.broker._loop import Broker, BrokerConfig

__all__ = ["Broker", "BrokerConfig", "Dispatcher"]
