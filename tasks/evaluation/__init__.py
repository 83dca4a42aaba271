"""Evaluation metrics for generated instrumentals: harmony with the vocal, key/tempo, FAD, CLAP, sanity."""
