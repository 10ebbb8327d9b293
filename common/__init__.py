"""Pieces every area uses: running commands, rate-limited logging, clocks."""
