"""Everything that knows about Ray, files and clusters."""
