"""Recovery after pruning: masks frozen, the kept weights tuned block by block, then distilled end to end."""
