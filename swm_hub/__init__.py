"""swm-hub: make LLMs shallower by Sliding-Window Merging of redundant decoder layers."""

__version__ = "0.1.0"

__all__ = ["__version__"]
