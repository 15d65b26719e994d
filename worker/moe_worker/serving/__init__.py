"""The leader's side of serving, torch-free: the port the HTTP layer talks to (`generation`),
the scheduler and its KV-block mirror (`scheduler`, `blocks`), the step descriptor every rank
runs (`step`), the loop's leader half (`leader`) and built-in traffic (`traffic`)."""
