"""Ensemble building from candidate models' out-of-fold probabilities."""
