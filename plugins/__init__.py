"""guardrail's built-in stages, installed as the import package `guardrail_plugins`.

Each module is a plugin registered through the entry-point group `guardrail` in pyproject.toml,
exactly as a third-party package would register its own. One folder per stage:

    reformulation/   reformulators and the captioners they use (model, ocr)
    risk/            risk assessors (prototype_similarity, mean_difference, linear_probe)
    steering/        steering controllers (prototype_interpolation, refusal_direction)
    audit/           audit sinks (jsonl)
"""
