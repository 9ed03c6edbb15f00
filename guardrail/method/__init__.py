"""The method's maths and data: risk formulas, probes, prompts, the refusal test and artifacts.
Pure functions and values; nothing here runs a model."""
