"""The shared-storage mailbox between HSMs and the SPM (vdsm v1 compatible)."""
