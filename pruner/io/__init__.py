"""What goes in and out: models, calibration text, artifacts (export), the model card, gradient files, plots."""
