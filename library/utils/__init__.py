"""Small helpers shared by every package (no torch imports here)."""
