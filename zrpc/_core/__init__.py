"""The sans-IO cores: plain classes fed with events and an injected clock, returning actions.

Nothing here imports zmq, click or rich (an import contract checks it), so every rule of the
protocol, the client's failover and the worker's admission is tested in microseconds.
"""
