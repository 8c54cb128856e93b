"""Library-affine clusters: N verdant-trio nodes behind HAProxy, each library on exactly one node.

A library must have one writer (one place assigns server order and compacts its shard), so a
cluster grows by affinity, never by sharing a library: every library id hashes to one of
`placement.SLOT_COUNT` slots, a placement table says which node owns each slot, and HAProxy
routes every request to the owner of its library's slot with its own converters.

- `placement`: the slot of a library id, the placement table, its text format, and moves
  (pure logic: it imports nothing that does I/O);
- `tablefile`: the table file, read and checked, or replaced atomically;
- `haproxy`: the HAProxy 2.6 configuration that routes by that table (text).

The engine knows nothing of this: it is given an `owns(library_id)` callable and a
`release(predicate)` operation (`engine.registry`), and the service wires them to the table.
"""
