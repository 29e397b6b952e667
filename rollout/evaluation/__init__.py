"""`switchkd eval`: held-out scores of a model and the statistics that compare two reports."""
