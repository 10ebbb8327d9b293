"""The SPM daemon: the one host that changes LVM metadata."""
