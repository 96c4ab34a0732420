"""Which label attention for the multi-label model: a key projection (query from the text embedding, keys a
learned projection of the positions) or class-specific residual attention (the positions' dot products with the
label's classifier weight plus its projected text embedding: model.multilabel.classifier)?

Chosen on a validation slice of openclipart-scenes' train split (scenes 600-1199: outside the benchmark's pool,
the first 600, and never the test split); human label sets only, 30 and 100 of them, 2 random splits of the slice.
The key-projection variant is re-created here by replacing the classifier's parameters and logits.
Writes bench/results/simulate/multilabel/attention_validation.json.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

from model.datasets import create_dataset
from model.io import atomic_write_json
from model.multilabel import (
    MultiLabelLearner,
    MultiLabelRoundLabels,
    MultiLabelSettings,
    MultiLabelTrainingConfig,
    mean_average_precision,
)
from model.multilabel.classifier import MultiLabelClassifier
from model.simulate.multilabel import label_text_embeddings
from model.spatial_features import cached_spatial_features

OUT = "bench/results/simulate/multilabel/attention_validation.json"
KEY_DIM = 32


def key_projection_parameters(self):
    parameters = residual_parameters(self)
    generator = torch.Generator().manual_seed(1)
    e, k = self.label_text.shape[1], self.projection.out_channels
    parameters["text_to_query"] = torch.randn(e, KEY_DIM, generator=generator) * e**-0.5
    parameters["position_to_key"] = torch.randn(k, KEY_DIM, generator=generator) * k**-0.5
    return parameters


def key_projection_logits(self, parameters, positions, pmi):
    logits = F.linear(positions.mean(dim=1), parameters["global_head.weight"], parameters["bias"])
    if self.config.label_features:
        queries = torch.from_numpy(self.label_text) @ parameters["text_to_query"]
        keys = positions @ parameters["position_to_key"]
        attention = torch.softmax(torch.einsum("npa,la->nlp", keys, queries) / KEY_DIM**0.5, dim=2)
        pooled = torch.einsum("nlp,npk->nlk", attention, positions)
        logits = logits + (pooled * parameters["label_head.weight"]).sum(dim=2)
    return logits


residual_parameters, residual_logits = MultiLabelClassifier._initial_parameters, MultiLabelClassifier._logits


def main() -> None:
    torch.set_num_threads(1)
    dataset = create_dataset("openclipart-scenes")
    train = dataset.split("train")
    maps = np.asarray(cached_spatial_features(train))[600:1200]
    truth = np.asarray(train.label_sets, dtype=bool)[600:1200]
    names = tuple(dataset.label_names)
    text = label_text_embeddings(names, "~/.cache/vlm-al")
    out: dict[str, object] = {}
    for variant in ("key-projection", "residual-attention"):
        MultiLabelClassifier._initial_parameters = (key_projection_parameters if variant == "key-projection"
                                                    else residual_parameters)
        MultiLabelClassifier._logits = key_projection_logits if variant == "key-projection" else residual_logits
        for n_labelled in (30, 100):
            for label_features in (False, True):
                values = []
                for split_seed in range(2):
                    order = np.random.default_rng(split_seed).permutation(600)
                    pool, validation = order[:350], order[350:]
                    config = MultiLabelTrainingConfig(label_features=label_features, cooccurrence=False, epochs=100)
                    learner = MultiLabelLearner(names, text, maps[pool],
                                                MultiLabelSettings(training=config, pseudo_labels=False))
                    labelled = np.zeros(350, dtype=bool)
                    labelled[:n_labelled] = True
                    model = learner.train(MultiLabelRoundLabels(np.where(labelled[:, None], truth[pool], False),
                                                                labelled, None))
                    values.append(mean_average_precision(model.classifier.predict_proba(maps[validation]),
                                                         truth[validation]))
                key = f"{variant} {n_labelled} {'label-features' if label_features else 'global'}"
                out[key] = round(float(np.mean(values)) * 100, 1)
                print(key, out[key], flush=True)
    out["load_average"] = [round(v, 2) for v in os.getloadavg()]
    atomic_write_json(OUT, out)


if __name__ == "__main__":
    main()
