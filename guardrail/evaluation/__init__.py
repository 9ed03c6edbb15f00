"""Evaluation: data sets, the refusal judge, the harness behind `guardrail eval`, metrics, plots,
reports, FigStep-style typographic images and the per-layer Fisher diagnostic.

Nothing here is imported by the guard itself; it measures the guard from the outside, through the
same `Guardrail` an application uses.
"""
