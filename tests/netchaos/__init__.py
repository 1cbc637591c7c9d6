"""HA rules across real network interfaces: brokers, workers and clients on throwaway hosts
(network namespaces joined by a bridge), with faults made by nftables inside the hosts."""
