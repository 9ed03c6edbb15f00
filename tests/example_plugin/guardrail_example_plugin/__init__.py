"""An example third-party guardrail plugin (see plugin.py)."""
