"""Stage drivers: one readable loop per algorithm."""
