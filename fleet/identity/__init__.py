"""Who is who on the broker: the fleet's certificate authority, device enrollment and
revocation, and the Mosquitto configuration that confines each identity to its own topics."""
