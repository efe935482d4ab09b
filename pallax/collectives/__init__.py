"""Overlapped collective matmuls and the overlap proof. Nothing here yet."""
