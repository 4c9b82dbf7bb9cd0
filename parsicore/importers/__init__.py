"""Optional importers (ONNX); the framework packages are optional extras, imported lazily."""
