"""The engine room: the backend seam, the typed interventions a steering plan is made of, and the
transformers backend with its hooks and shared image prefixes. The only code that touches a model."""
