"""One rank at run time: wired together (`rank.Runtime`), the Backend the HTTP layer sees
(`backend`), its shared state (`state`), joining the group and loading the shard (`joining`,
`loading` for the weight source, `initial_plan`) and the lock-step serving loop (`loop`)."""
