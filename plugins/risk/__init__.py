"""Built-in risk stages."""
