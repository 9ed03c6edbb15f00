"""Built-in steering stages."""
