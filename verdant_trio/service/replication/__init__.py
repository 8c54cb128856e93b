"""Continuous replication with Litestream and restores from its replicas (issue 14).

`litestream`: the Litestream configuration for a databases directory, its binary, replica
addresses. `restore`: shards back from a replica, checked and marked. `lock`: who is using a
databases directory. The restored mark itself, which the engine reads when a library opens,
lives in `storage.restored` (the engine may not import the service layer).
"""
