"""Model-family adapters; each file registers one with ``@register_adapter``."""
