"""Red Dwarf agent."""
