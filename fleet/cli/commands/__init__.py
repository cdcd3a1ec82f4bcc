"""The `fleet` command groups, one module each (joined in `fleet/cli/app.py`)."""
