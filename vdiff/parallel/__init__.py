"""Meshes, logical-axis rules and the one helper for activation sharding."""
