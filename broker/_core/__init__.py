"""The broker's sans-IO cores: dispatch, load-balancing strategies, Binary Star and the monitor.
Nothing here imports zmq, click or rich; zrpc.broker._loop drives them."""
