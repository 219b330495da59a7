"""propmaps-jax: propagation maps and locality analysis of the one-pixel attack."""

from propmaps_jax.errors import PropmapsError

__all__ = ["PropmapsError"]
__version__ = "0.1.0"
