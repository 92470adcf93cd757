"""Red Dwarf server."""
