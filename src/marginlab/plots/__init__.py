"""Figures, drawn only from the files of run directories (never from live training state)."""
