"""Built-in board profiles, one YAML file each; installed as the package data ``smpq_edge.board_profiles``."""
