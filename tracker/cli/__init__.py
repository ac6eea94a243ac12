"""The `tracker` command (typer) and its rich views of tasks and deliveries.

The top layer, with the API: may import anything, devtools included.
"""
