"""One rank's lock-step serving loop and the `Backend` it offers the HTTP layer (`rank`), and the
rank's weight source from its settings (`loading`)."""
