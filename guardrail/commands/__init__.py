"""One module per `guardrail` subcommand; see guardrail/cli.py."""
