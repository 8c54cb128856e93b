"""The running server without HTTP: the task that owns each library's shard, the connected
replicas and their bounded queues, the core that admits them. Imports `sync` and `storage`."""
