"""``xtnd inject``: fault injection against the real stack, checked from a
recorded history (see scenarios.py for the scenarios, checker.py for what
is proven, harness.py for the command)."""
