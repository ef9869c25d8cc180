"""The local gateway simulator: server, wire formats, images and fault settings."""
