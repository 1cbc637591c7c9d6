"""The zrpc broker: dispatch state, (later) the binary-star machine and monitor, and the loop."""

from zrpc.broker._core._dispatch import Dispatcher
from zrpc.broker._loop import Broker, BrokerConfig

__all__ = ["Broker", "BrokerConfig", "Dispatcher"]
