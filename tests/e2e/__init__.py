"""The real `tracker` processes end to end: API, worker, beat, the demo."""
