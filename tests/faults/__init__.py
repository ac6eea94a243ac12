"""The real processes while their database, broker, upstream and receivers misbehave."""
