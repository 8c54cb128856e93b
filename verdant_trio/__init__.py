"""verdant-trio: a Trio sync server for Verdant apps."""
