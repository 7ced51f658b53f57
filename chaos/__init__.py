"""snapguard."""
