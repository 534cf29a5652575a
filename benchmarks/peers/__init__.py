"""Peer models the benchmarks run beside the project's own (written here from the peers' published shapes)."""
