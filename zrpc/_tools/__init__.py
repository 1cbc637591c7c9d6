"""Operator tools, apart from the library: the `zrpc` command, the demo, the monitor view and
the pair supervisor. Nothing in the library imports them."""
