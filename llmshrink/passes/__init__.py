"""Built-in passes; importing this package registers each of them."""

from llmshrink.passes import (
    distill,  # noqa: F401
    kronecker,  # noqa: F401
)
