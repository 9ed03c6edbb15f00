"""Built-in audit stages."""
