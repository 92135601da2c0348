"""cordum-mcp. The MCP SDK's package `__init__`s import its client and high-level server too (11 MB
per process); only the low-level server and transports are used here, so those `__init__`s run
only if something reads from the packages themselves (`cordum.infra.lazy`)."""

from cordum.infra.lazy import defer_init

defer_init("mcp.server")
