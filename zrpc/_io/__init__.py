"""The loops: the only zmq users of the library. Each owns its sockets and translates frames
to calls on a core from zrpc._core, and the core's actions back to frames."""
