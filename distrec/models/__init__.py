"""The recommender: a PEFT-wrapped language-model backbone as item tower, a causal
transformer over item vectors as user tower, scored by dot product; and the run directory
that stores it (the only place that writes or reads a trained model)."""
