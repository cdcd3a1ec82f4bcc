"""The `fleet` command line and the hub's HTTP client."""
