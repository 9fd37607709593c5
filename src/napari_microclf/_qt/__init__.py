"""The dock widgets (Annotate, Train, Predict) and their Qt helpers; computation lives in core."""
