"""The engine: works without Qt and napari; TensorFlow is imported inside functions only."""
