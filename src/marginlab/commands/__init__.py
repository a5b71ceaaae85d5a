"""One module per ``marginlab`` sub-command; each defines ``register(subparsers)``."""
