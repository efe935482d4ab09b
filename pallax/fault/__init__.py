"""Fault tolerance: in-memory replicas, recovery, SDC detection, goodput. Nothing here yet."""
