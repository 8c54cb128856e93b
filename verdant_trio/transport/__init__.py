"""Bytes to and from clients: the sync websocket on the TCP stream, the upgrade, the listeners
that hand everything else to hypercorn, and the Quart-Trio app. Imports the layers below."""
