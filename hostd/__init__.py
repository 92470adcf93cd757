"""Red Dwarf hostd."""
