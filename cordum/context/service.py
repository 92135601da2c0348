"""cordum-context-engine: lands with a later release."""

from cordum.runtime.service import not_available

main = not_available("cordum-context-engine", "lands with a later release")
