"""steer.hooks."""
