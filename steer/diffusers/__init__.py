"""steer.diffusers."""
