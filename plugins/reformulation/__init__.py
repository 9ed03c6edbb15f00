"""Built-in reformulation stages."""
