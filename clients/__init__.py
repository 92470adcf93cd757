"""Red Dwarf clients."""
