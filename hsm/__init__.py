"""The HSM daemon: watches this host's VM disks and asks for space."""
