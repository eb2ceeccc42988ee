"""AI governance plugins for Kong Gateway: semantic cache, token quotas, semantic routing."""
__version__ = "0.1.0"
