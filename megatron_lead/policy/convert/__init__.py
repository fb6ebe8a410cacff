"""HF <-> Megatron weights: per-family tables, offline conversion, in-memory gather."""
