"""guardrail's HTTP server (optional extra: `pip install 'guardrail[serve]'`).

    from guardrail.serve import ServeConfig, create_app
    app = create_app(guard, ServeConfig(admin_token="..."))   # any ASGI server can run it

or from the command line: `guardrail serve --model M --artifacts DIR --policies DIR`.
"""

from __future__ import annotations

try:
    from guardrail.serve.app import ServeConfig, ServerState, create_app
except ImportError as exc:  # pragma: no cover - depends on the environment
    from guardrail.errors import GuardrailError

    raise GuardrailError(
        f"the HTTP server needs the 'serve' extra ({exc.name} is missing): pip install 'guardrail[serve]'"
    ) from exc

__all__ = ["ServeConfig", "ServerState", "create_app"]
