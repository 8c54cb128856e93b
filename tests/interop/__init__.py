"""Interop tests: real Verdant clients (Node) against the sync server."""
