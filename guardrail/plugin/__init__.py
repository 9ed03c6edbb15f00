"""The plugin room: hook specifications, stage Protocols, the plugin manager and the SDK (the one
module plugins import from)."""
