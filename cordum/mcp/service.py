"""cordum-mcp: lands with a later release."""

from cordum.runtime.service import not_available

main = not_available("cordum-mcp", "lands with a later release")
