"""Storage domains and volumes."""
