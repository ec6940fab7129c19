"""Text-side data rules of the TAP/M4C pipeline: normalisation, PHOC, answer vocabulary and targets."""
