"""cordum-safety-kernel: lands with the governed job path."""

from cordum.runtime.service import not_available

main = not_available("cordum-safety-kernel", "lands with the governed job path")
