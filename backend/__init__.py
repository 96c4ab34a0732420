"""vlm-al Label Studio ML backend: a thin HTTP adapter between Label Studio and the ``model`` library."""
