"""Meshes and logical-axis rules (issue: sharding and overlapped collectives). Nothing here yet."""
