"""vlm-al model library: weak annotators, embeddings, noise model, fine-grained model, query strategies.

Importable without Flask or Label Studio; the server in ``backend/`` is a thin adapter over it.
"""
