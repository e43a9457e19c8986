"""Control plane: turns requests into jobs, orders them, deduplicates retries, runs them."""
