"""Red Dwarf common."""
