"""cordum-scheduler: lands with the governed job path."""

from cordum.runtime.service import not_available

main = not_available("cordum-scheduler", "lands with the governed job path")
