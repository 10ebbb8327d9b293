"""LVM commands, reports and LV activation."""
