"""rCM objective terms: sCM (forward divergence) and DMD (reverse divergence), each `(loss, metrics)`."""
