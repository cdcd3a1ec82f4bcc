"""What the whole fleet agrees on: wire protocol, model bundle format, and the `fleet` tool."""
