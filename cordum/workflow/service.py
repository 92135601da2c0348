"""cordum-workflow-engine: lands with a later release."""

from cordum.runtime.service import not_available

main = not_available("cordum-workflow-engine", "lands with a later release")
