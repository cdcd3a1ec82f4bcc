"""The MQTT session both daemons use (with an in-memory fake beside it), and the process
tuning their entry points apply."""
