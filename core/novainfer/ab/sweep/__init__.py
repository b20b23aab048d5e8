"""The sweep side of nova-ab: everything the sweep process runs, on plain data (no torch is imported here)."""
