"""The zrpc broker: dispatch state, (later) the binary-star machine and monitor, and the loop."""

from ._dispatch import Dispatcher
from ._loop import Broker, BrokerConfig

__all__ = ["Broker", "BrokerConfig", "Dispatcher"]
