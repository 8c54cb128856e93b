"""Where libraries live: the APSW shard per library (the Node server's `sqlShard` schema), safe
names on disk, and file storage. Imports only `sync`."""
